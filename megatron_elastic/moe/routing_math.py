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
from typing import Optional, Tuple

import torch

__all__ = [
    "splitmix64",
    "derive_seed",
    "top_p_k",
    "per_token_topk",
    "candidate_pool_size",
    "sample_from_candidate_pool",
    "keyed_uniforms",
    "hierarchical_router_loss",
    "expert_cooccurrence",
]


# ---------------------------------------------------------------------- the counter-based hash
# One SplitMix64 (Vigna) for the whole package: on Python ints for seeds (k draws, pool keys)
# and on int64 tensors for per-token draws (keyed_uniforms); same constants, same outputs.
_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB

def splitmix64(x: int) -> int:
    """One step of Vigna's SplitMix64: advance ``x`` by the golden gamma and mix.

    A tiny, well-studied 64-bit bijective mixer; consecutive integers map to
    statistically independent outputs, which is exactly what is needed to turn
    structured coordinates (iteration 0, 1, 2, ...) into unrelated seeds.
    Pure Python integer arithmetic, so the result is identical on every
    platform, Python build and torch version.
    """
    z = (x + _GOLDEN_GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def derive_seed(*values: int) -> int:
    """Hash an ordered tuple of integers into a 63-bit seed.

    Chains SplitMix64 over the values (``state = splitmix64(state ^ v)``).
    Order matters and tuples of different lengths give unrelated seeds.
    Negative integers are folded in two's complement.  The result is kept
    below ``2**63`` so it is a valid seed for any consumer (torch, numpy).

    Other components (e.g. the EMoE per-token candidate sampling) can use this
    to derive their own rank-consistent generators; they should include a
    distinct leading tag to keep their streams independent of the k draws.
    """
    state = 0
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"derive_seed expects ints, got {type(v).__name__}: {v!r}")
        state = splitmix64(state ^ (v & _MASK64))
    return state >> 1


def _check_k_range(k_min: int, k_max: int) -> None:
    for name, v in (("k_min", k_min), ("k_max", k_max)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if k_min < 1:
        raise ValueError(f"k_min must be >= 1, got {k_min}")
    if k_max < k_min:
        raise ValueError(f"k_max must be >= k_min, got k_min={k_min}, k_max={k_max}")


def _check_p(p: float) -> None:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not (0.0 < p <= 1.0):
        raise ValueError(f"top-p threshold must lie in (0, 1], got {p!r}")


def top_p_k(
    probs: torch.Tensor,
    p: float,
    k_min: int,
    k_max: int,
    *,
    is_sorted: bool = False,
    atol: float = 1e-6,
) -> torch.Tensor:
    """Per-token ``k``: the smallest ``k`` whose top-``k`` probability mass reaches ``p``.

    Args:
        probs: ``[..., N]`` router probabilities (softmax over all experts).
            If ``is_sorted`` is True the last dim is assumed already sorted in
            descending order (saves a sort when the caller has one).
        p: mass threshold in ``(0, 1]``.
        k_min, k_max: clip range; ``k_max`` must not exceed ``N``.
        atol: tolerance on the cumulative mass.  Low-precision probabilities
            rarely sum exactly to the hand value (``0.5 + 0.3`` in float32 is
            not exactly ``0.8``), so a cumulative mass within ``atol`` of ``p``
            counts as reaching it.  The sum is accumulated in float64.

    Returns:
        ``LongTensor[...]`` with values in ``[k_min, k_max]``; no gradient.

    Example: probs ``[0.5, 0.3, 0.1, 0.1]`` -> ``p=0.5: 1``, ``p=0.7: 2``,
    ``p=0.8: 2``, ``p=0.85: 3``, ``p=1.0: 4``.
    """
    _check_p(p)
    _check_k_range(k_min, k_max)
    if probs.dim() < 1:
        raise ValueError("probs must have at least one dimension (experts last)")
    n = probs.shape[-1]
    if k_max > n:
        raise ValueError(f"k_max={k_max} exceeds the number of experts {n}")
    with torch.no_grad():
        sorted_probs = probs if is_sorted else torch.sort(probs, dim=-1, descending=True).values
        cum = torch.cumsum(sorted_probs.to(torch.float64), dim=-1)
        # Number of prefixes that are still short of p, plus one = first prefix reaching p.
        k = (cum < (p - atol)).sum(dim=-1) + 1
        return k.clamp_(min=k_min, max=k_max).to(torch.long)


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


def per_token_topk(
    probs: torch.Tensor, k_per_token: torch.Tensor, k_max: int, *, validate: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``k_t`` routing where every token ``t`` has its own ``k_t`` (top-p M-MoE).

    Args:
        probs: ``[T, N]`` softmax over all experts.
        k_per_token: ``[T]`` integer ``k_t`` with ``1 <= k_t <= k_max``
            (e.g. from :func:`top_p_k`).
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


def _to_i64(x: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores."""
    x &= _MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift on int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix64_tensor(x: torch.Tensor) -> torch.Tensor:
    # int64 multiplication wraps modulo 2**64, exactly the unsigned arithmetic SplitMix64 needs.
    z = x + _to_i64(_GOLDEN_GAMMA)
    z = (z ^ _srl(z, 30)) * _to_i64(_MIX1)
    z = (z ^ _srl(z, 27)) * _to_i64(_MIX2)
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


def hierarchical_router_loss(probs: torch.Tensor, coeff: float = 1.0,
                             padding: Optional[torch.Tensor] = None) -> torch.Tensor:
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

    ``padding`` (``[T]`` bool, True = not data) takes the mean over the other tokens only,
    without a host sync (0 when every token is padding).
    """
    t, n = _check_probs(probs)
    if t == 0:
        raise ValueError("hierarchical_router_loss needs at least one token")
    p = probs if probs.dtype in (torch.float32, torch.float64) else probs.float()
    tiny = torch.finfo(p.dtype).tiny
    neg_entropy = (p * torch.log(p.clamp_min(tiny))).sum(dim=-1)  # sum_i p_i log p_i
    neg_kl = -(neg_entropy + math.log(n))  # = H(p) - log N = -KL(p || U)
    if padding is None:
        return coeff * neg_kl.mean()
    data = (~padding.reshape(-1)).to(neg_kl.dtype)
    return coeff * (neg_kl * data).sum() / data.sum().clamp_min(1.0)


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
