"""Reference implementations used only by the tests: plain, obviously-correct versions of what
the router computes through Megatron-core (top-k with renormalised gates, a dense gate matrix, the
Switch load-balancing loss at a variable k), and generator helpers for the schedule tests."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from megatron_elastic.moe.routing_math import _check_int, _check_probs, derive_seed


def topk_renormalized(probs: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` experts per token with gates renormalised to sum to 1.

    Args:
        probs: ``[T, N]`` softmax over all experts (caller applies softmax).
        k: number of experts, ``1 <= k <= N``.

    Returns:
        ``gates [T, k]`` (dtype of ``probs``, differentiable w.r.t. ``probs``,
        descending) and ``idx [T, k]`` (int64 expert ids).

    Renormalising makes the mixture weights independent of how much mass the
    *unselected* experts received, so the layer's output scale does not shrink
    when fewer experts are activated -- which is what lets one model serve any
    ``k``.  The denominator is at least ``k/N > 0`` for a probability vector,
    so no epsilon is added.
    """
    _, n = _check_probs(probs)
    _check_int("k", k, 1, n)
    vals, idx = torch.topk(probs, k, dim=-1)
    gates = vals / vals.sum(dim=-1, keepdim=True)
    return gates, idx


def to_dense(
    gates: torch.Tensor, idx: torch.Tensor, num_experts: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scatter ``[T, k]`` gates/indices to Megatron's dense ``[T, N]`` layout.

    Returns ``(routing_map, probs_dense)``: ``routing_map`` is ``bool [T, N]``
    (True where a token is sent to an expert) and ``probs_dense`` has the
    dtype of ``gates`` with zeros outside the selection.  The scatter is
    out-of-place, so gradients flow from ``probs_dense`` back to ``gates``.
    ``idx`` must hold distinct experts per row (as produced by top-k or by
    sampling without replacement); duplicates would be collapsed silently.

    Note the order is the reverse of ``TopKRouter.routing``'s
    ``(probs, routing_map)`` return value.
    """
    if gates.shape != idx.shape or gates.dim() != 2:
        raise ValueError(
            f"gates and idx must both be [T, k]; got {tuple(gates.shape)} and {tuple(idx.shape)}"
        )
    _check_int("num_experts", num_experts, max(1, gates.shape[1]))
    t = gates.shape[0]
    idx = idx.long()
    probs_dense = torch.zeros(t, num_experts, dtype=gates.dtype, device=gates.device).scatter(
        1, idx, gates
    )
    routing_map = torch.zeros(t, num_experts, dtype=torch.bool, device=gates.device).scatter(
        1, idx, True
    )
    return routing_map, probs_dense


def switch_load_balancing_loss_variable_k(
    probs: torch.Tensor,
    routing_map: torch.Tensor,
    k_used: Union[int, float, torch.Tensor, None] = None,
    coeff: float = 1.0,
    *,
    tokens_per_expert: Optional[torch.Tensor] = None,
    total_num_tokens: Optional[Union[int, torch.Tensor]] = None,
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss normalised by the ``k`` actually used.

    Computes exactly what Megatron-core's
    ``moe_utils.switch_load_balancing_loss_func`` (unfused path) computes::

        N * coeff / (k * T**2) * sum_i (sum_t probs[t, i]) * tokens_per_expert[i]
          = N * coeff * sum_i f_i * P_i,
        f_i = tokens_per_expert[i] / (T * k),   P_i = mean_t probs[t, i]

    but with ``k`` = the number of experts the tokens were really routed to
    this step, so that ``sum_i f_i = 1`` and the loss keeps its scale (1 at
    perfect balance, ``N`` at total collapse onto one expert) whatever ``k``
    the schedule drew.  Using Megatron's fixed ``moe_router_topk`` with a
    routing map at a different ``k`` would scale the loss by ``k_used/topk``.

    Args:
        probs: ``[T, N]`` full softmax over all experts (Megatron feeds its
            ``scores_for_aux_loss``, i.e. float32 softmax of the logits, not
            the renormalised combine weights).  Gradient flows only through
            this argument.
        routing_map: ``bool [T, N]`` of the experts actually activated.
        k_used: ``int``/``float`` for a layer-wide ``k``; a ``[T]`` tensor of
            per-token ``k`` (top-p), reduced to its mean -- the mean is the
            normaliser that makes ``sum_i f_i = 1``; or ``None`` to infer
            ``k = sum(tokens_per_expert) / total_num_tokens`` (the same mean,
            and also correct when counts are globally reduced).
        coeff: ``moe_aux_loss_coeff``.
        tokens_per_expert: ``[N]`` counts; default ``routing_map.sum(0)``.  Pass
            the TP/CP-reduced counts to mirror Megatron's distributed version.
        total_num_tokens: ``T`` matching ``tokens_per_expert``'s level;
            default ``probs.shape[0]``.
    """
    t, n = _check_probs(probs)
    if routing_map.shape != probs.shape:
        raise ValueError(
            f"routing_map shape {tuple(routing_map.shape)} != probs shape {tuple(probs.shape)}"
        )
    if tokens_per_expert is None:
        tokens_per_expert = routing_map.sum(dim=0)
    elif tokens_per_expert.shape != (n,):
        raise ValueError(f"tokens_per_expert must have shape [{n}]")
    if total_num_tokens is None:
        total_num_tokens = t
    if k_used is None:
        k = tokens_per_expert.sum().to(probs.dtype) / total_num_tokens
    elif isinstance(k_used, torch.Tensor):
        k = k_used.to(device=probs.device, dtype=probs.dtype).mean()
    elif isinstance(k_used, (int, float)) and not isinstance(k_used, bool):
        if not k_used > 0:
            raise ValueError(f"k_used must be > 0, got {k_used}")
        k = k_used
    else:
        raise ValueError(f"k_used must be a number, a tensor or None, got {k_used!r}")
    aggregated_probs_per_expert = probs.sum(dim=0)
    return torch.sum(aggregated_probs_per_expert * tokens_per_expert) * (
        n * coeff / (k * total_num_tokens * total_num_tokens)
    )


def make_generator(*values: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh :class:`torch.Generator` on ``device`` seeded with ``derive_seed(*values)``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*values))
    return g


def ks_for_layers(sampler, iteration: int, microbatch: int, layers: Sequence[int]) -> List[int]:
    """``[sampler.k_for(iteration, microbatch, l) for l in layers]``."""
    return [sampler.k_for(iteration, microbatch, layer) for layer in layers]
