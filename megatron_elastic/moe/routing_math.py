"""Pure tensor math for the elastic (variable-k) MoE router.

No Megatron imports: everything here is a plain function of tensors so it can
be unit-tested by hand and reused by any router implementation.

Conventions (matching Megatron-core 0.16 ``TopKRouter.routing`` /
``moe_utils.topk_routing_with_score_function``):

* router inputs are flattened to ``[T, N]`` (``T = seq_len * micro_batch``
  tokens, ``N`` experts); ``probs`` passed here is the softmax over **all**
  ``N`` experts, computed by the caller;
* the router *output* is a pair of dense ``[T, N]`` tensors: the combine
  weights (zero for unselected experts, dtype of the logits) and a ``bool``
  ``routing_map``.  Megatron returns them in the order ``(probs, routing_map)``;
  the helpers here return ``(routing_map, dense_gates)`` -- mind the order.
* "Mixtral semantics": top-k of the full softmax, renormalised over the
  selected experts.  This equals Megatron's default
  (``moe_router_pre_softmax=False``: softmax over the top-k *logits*), because
  softmax is monotone and the renormalised top-k of a softmax is the softmax
  of the top-k logits.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

__all__ = [
    "topk_renormalized",
    "to_dense",
    "per_token_topk",
    "candidate_pool_size",
    "sample_from_candidate_pool",
    "keyed_uniforms",
    "hierarchical_router_loss",
    "switch_load_balancing_loss_variable_k",
    "expert_cooccurrence",
]


def _check_probs(probs: torch.Tensor) -> Tuple[int, int]:
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        raise ValueError(
            f"probs must be a 2-D tensor [num_tokens, num_experts], got "
            f"{tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs)}"
        )
    return probs.shape[0], probs.shape[1]


def _check_int(name: str, v: int, lo: int, hi: Optional[int] = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an int, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}={v} must be in {bound}")


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


def per_token_topk(
    probs: torch.Tensor, k_per_token: torch.Tensor, k_max: int, *, validate: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``k_t`` routing where every token ``t`` has its own ``k_t`` (top-p M-MoE).

    Args:
        probs: ``[T, N]`` softmax over all experts.
        k_per_token: ``[T]`` integer ``k_t`` with ``1 <= k_t <= k_max``
            (e.g. from :func:`megatron_elastic.moe.schedules.top_p_k`).
        k_max: static upper bound (``<= N``); only the top ``k_max`` experts
            are ever considered, keeping the selection a fixed-shape op.
        validate: check the range of ``k_per_token``.  This reads values back
            to the host (a device sync on GPU); hot paths that produced
            ``k_per_token`` by clipping can pass ``False``.

    Returns:
        ``routing_map bool [T, N]`` and ``gates [T, N]`` -- the selected
        probabilities renormalised over each token's own selected set, zeros
        elsewhere (differentiable w.r.t. ``probs``).
    """
    t, n = _check_probs(probs)
    _check_int("k_max", k_max, 1, n)
    if not isinstance(k_per_token, torch.Tensor) or k_per_token.shape != (t,):
        raise ValueError(f"k_per_token must be a tensor of shape [{t}]")
    if k_per_token.is_floating_point() or k_per_token.is_complex():
        raise ValueError("k_per_token must be an integer tensor")
    if validate and t > 0:
        lo, hi = int(k_per_token.min()), int(k_per_token.max())
        if lo < 1 or hi > k_max:
            raise ValueError(f"k_per_token values must lie in [1, {k_max}], got [{lo}, {hi}]")
    vals, idx = torch.topk(probs, k_max, dim=-1)
    ranks = torch.arange(k_max, device=probs.device).unsqueeze(0)
    keep = ranks < k_per_token.to(probs.device).unsqueeze(1)  # [T, k_max]
    kept = vals * keep
    gates = kept / kept.sum(dim=-1, keepdim=True)
    gates_dense = torch.zeros_like(probs).scatter(1, idx, gates)
    routing_map = torch.zeros(t, n, dtype=torch.bool, device=probs.device).scatter(1, idx, keep)
    return routing_map, gates_dense


def candidate_pool_size(k: int, pool_ratio: float, num_experts: int) -> int:
    """EMoE candidate-pool size ``k_ideal = ceil(pool_ratio * k)``, clipped to ``N``.

    ``pool_ratio >= 1``.  Clipping (rather than raising) is done here, once,
    at configuration time, so :func:`sample_from_candidate_pool` can stay
    strict.  A tiny tolerance keeps e.g. ``1.5 * 4 = 6.000000000000001`` at 6.
    """
    _check_int("num_experts", num_experts, 1)
    _check_int("k", k, 1, num_experts)
    if not isinstance(pool_ratio, (int, float)) or isinstance(pool_ratio, bool):
        raise ValueError(f"pool_ratio must be a number >= 1, got {pool_ratio!r}")
    if not math.isfinite(pool_ratio) or pool_ratio < 1:
        raise ValueError(f"pool_ratio must be a finite number >= 1, got {pool_ratio!r}")
    k_ideal = math.ceil(pool_ratio * k - 1e-9)
    return max(k, min(k_ideal, num_experts))


def sample_from_candidate_pool(
    probs: torch.Tensor,
    k: int,
    k_ideal: int,
    generator: Optional[torch.Generator] = None,
    uniforms: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """EMoE routing: ``k`` experts drawn uniformly from each token's top-``k_ideal``.

    For every token independently, the ``k_ideal`` most probable experts form
    the candidate pool and a uniformly random ``k``-subset of it (without
    replacement) is activated.  Gates are the sampled experts' probabilities
    renormalised over the sampled set.  Training-only: exposing every expert
    in the pool to varied co-activation partners is what makes the model
    robust to a different ``k`` at inference.

    The random subset is the top-``k`` of ``k_ideal`` i.i.d. uniform scores
    (ties have probability ~0), a fixed-shape, vectorised equivalent of
    per-token ``randperm``.

    Args:
        probs: ``[T, N]`` softmax over all experts.
        k: experts activated per token, ``1 <= k <= k_ideal``.
        k_ideal: pool size, ``k_ideal <= N`` (use :func:`candidate_pool_size`).
        generator: source of randomness.  The uniforms are drawn on the
            generator's device and moved to ``probs.device``, so a CPU
            generator works with CUDA ``probs``.  ``None`` uses (and
            advances) the global RNG of ``probs.device`` -- avoid that in
            training, where a seeded generator keeps ranks consistent.
        uniforms: ``[T, k_ideal]`` scores to use instead of drawing from
            ``generator`` (e.g. :func:`keyed_uniforms`, which makes the draw
            independent of how tokens are spread over ranks).

    Returns:
        ``gates [T, k]`` (differentiable w.r.t. ``probs``) and ``idx [T, k]``;
        the order within a row is random, not by probability.

    Raises:
        ValueError: if ``k_ideal > N`` or ``k > k_ideal`` (or either < 1).
    """
    t, n = _check_probs(probs)
    _check_int("k_ideal", k_ideal, 1)
    if k_ideal > n:
        raise ValueError(f"k_ideal={k_ideal} exceeds the number of experts {n}")
    _check_int("k", k, 1)
    if k > k_ideal:
        raise ValueError(f"k={k} must not exceed k_ideal={k_ideal}")
    pool_vals, pool_idx = torch.topk(probs, k_ideal, dim=-1)
    if uniforms is not None:
        if uniforms.shape != (t, k_ideal):
            raise ValueError(f"uniforms must have shape [{t}, {k_ideal}], got {tuple(uniforms.shape)}")
        scores = uniforms
    else:
        rand_device = generator.device if generator is not None else probs.device
        scores = torch.rand(t, k_ideal, generator=generator, device=rand_device)
    pick = torch.topk(scores.to(probs.device), k, dim=-1).indices  # [T, k] positions in the pool
    idx = torch.gather(pool_idx, 1, pick)
    vals = torch.gather(pool_vals, 1, pick)
    gates = vals / vals.sum(dim=-1, keepdim=True)
    return gates, idx


_M64 = (1 << 64) - 1


def _to_i64(x: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores."""
    x &= _M64
    return x - (1 << 64) if x >= (1 << 63) else x


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift on int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix64_tensor(x: torch.Tensor) -> torch.Tensor:
    # int64 multiplication wraps modulo 2**64, exactly the unsigned arithmetic SplitMix64 needs.
    z = x + _to_i64(0x9E3779B97F4A7C15)
    z = (z ^ _srl(z, 30)) * _to_i64(0xBF58476D1CE4E5B9)
    z = (z ^ _srl(z, 27)) * _to_i64(0x94D049BB133111EB)
    return z ^ _srl(z, 31)


def keyed_uniforms(token_ids: torch.Tensor, n: int, key: int) -> torch.Tensor:
    """``[T, n]`` uniforms in [0, 1) that are a pure function of (key, token id, column).

    A counter-based generator: each value hashes its coordinates with SplitMix64, so a token's
    draws do not depend on which rank holds it, on the batch it shares, or on draw order. This is
    what makes EMoE pool sampling identical across data/expert-parallel layouts and resumes.
    """
    if token_ids.dim() != 1:
        raise ValueError("token_ids must be 1-D")
    base = _splitmix64_tensor(torch.full_like(token_ids, _to_i64(key), dtype=torch.int64) ^ token_ids.long())
    cols = torch.arange(n, device=token_ids.device, dtype=torch.int64)
    z = _splitmix64_tensor(base.unsqueeze(1) ^ _splitmix64_tensor(cols).unsqueeze(0))
    # top 53 bits -> double in [0, 1)
    return _srl(z, 11).to(torch.float64) * (1.0 / (1 << 53))


def hierarchical_router_loss(probs: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """``coeff * mean_t[-KL(p_t || U)] = coeff * mean_t[H(p_t) - log N]``.

    ``p_t`` is token ``t``'s full router distribution over the ``N`` experts
    and ``U`` the uniform distribution.  The value lies in ``[-log N, 0]``:
    0 for a uniform router, ``-log N`` for a one-hot router.  Minimising it
    sharpens the router so that the *ranking* of experts is decisive -- the
    property that makes truncating to fewer experts (smaller ``k``) at
    inference graceful.

    Why reverse KL ``KL(p || U)`` and not ``KL(U || p)``: the forward form has
    a ``1/p_i`` term in its gradient that explodes as any expert's
    probability goes to 0; the reverse form, through the softmax, has the
    bounded gradient ``dL/dz_j = -p_j (log p_j + H(p))`` w.r.t. the logits.

    Numerics: ``p log p`` is evaluated as ``p * log(max(p, tiny))`` so exact
    zeros (softmax underflow) contribute 0 with a finite gradient.
    Half-precision inputs are promoted to float32.
    """
    t, n = _check_probs(probs)
    if t == 0:
        raise ValueError("hierarchical_router_loss needs at least one token")
    p = probs if probs.dtype in (torch.float32, torch.float64) else probs.float()
    tiny = torch.finfo(p.dtype).tiny
    neg_entropy = (p * torch.log(p.clamp_min(tiny))).sum(dim=-1)  # sum_i p_i log p_i
    neg_kl = -(neg_entropy + math.log(n))  # = H(p) - log N = -KL(p || U)
    return coeff * neg_kl.mean()


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


def expert_cooccurrence(routing_map: torch.Tensor) -> torch.Tensor:
    """``C[i, j]`` = share of tokens that activate both expert ``i`` and ``j``.

    The diagonal ``C[i, i]`` is the share of tokens activating ``i``; rows of
    ``C`` sum to ``C[i, i] * E[k | i active]``.  Used as the EMoE diagnostic:
    plain top-k training concentrates mass on a few fixed expert pairs,
    candidate-pool sampling spreads co-activation over the pool.

    Returns float32 ``[N, N]`` (symmetric, no gradient).
    """
    if routing_map.dim() != 2:
        raise ValueError("routing_map must be [num_tokens, num_experts]")
    t = routing_map.shape[0]
    if t == 0:
        raise ValueError("expert_cooccurrence needs at least one token")
    with torch.no_grad():
        m = routing_map.to(torch.float32)
        return (m.transpose(0, 1) @ m) / t
