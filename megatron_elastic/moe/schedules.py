"""Schedules that choose the number of activated experts ``k`` during training.

Matryoshka-MoE (M-MoE) trains one model that works for any ``k`` in
``[k_min, k_max]`` at inference time by varying ``k`` during training.  How
often a new ``k`` is drawn is the *granularity* of the schedule:

``fixed``
    Always ``fixed_k`` (default ``k_max``): the ordinary top-k baseline.
``batch``
    One ``k`` per global batch (iteration), shared by every micro-batch and
    every MoE layer.
``microbatch``
    One ``k`` per (iteration, micro-batch), shared by every MoE layer.
``layerwise``
    One ``k`` per (iteration, micro-batch, layer): each MoE layer draws its own
    ``k`` on every step (the best variant in the M-MoE experiments, because the
    layers learn to cope with mismatched neighbours).
``top_p``
    ``k`` is decided *per token* in the router: the smallest ``k`` whose
    descending-sorted softmax mass reaches ``top_p``, clipped to
    ``[k_min, k_max]`` (see :func:`top_p_k`).  :meth:`KSampler.k_for` then only
    returns the upper bound ``k_max`` so callers can size buffers.

Draws follow :func:`k_distribution`: ``uniform`` over ``[k_min, k_max]`` or the
capacity-aware ``weighted`` law ``P(k) ∝ exp(log(k)/tau) = k**(1/tau)`` that
spends more training steps on the larger (more expensive, more capable)
configurations; ``tau=2`` gives ``P(k) ∝ sqrt(k)``, ``tau -> inf`` approaches
uniform.

Determinism without communication
---------------------------------
Every draw uses a fresh CPU :class:`torch.Generator` seeded from
``(seed, iteration, microbatch, layer)`` through a fixed integer hash
(SplitMix64 chaining, :func:`routing_math.derive_seed`).  Consequences:

* all ranks (TP / PP / EP / DP) compute the same ``k`` for the same coordinates
  without exchanging anything -- essential because a mismatch between ranks of
  one tensor-/expert-parallel group would deadlock the all-to-all;
* a run resumed from a checkpoint at iteration ``i`` draws exactly the ``k``
  the uninterrupted run would have drawn (the sampler is stateless);
* the global torch / Python RNG streams are never consumed, so enabling the
  schedule does not perturb dropout masks, data order or initialisation.

Python's built-in ``hash()`` is deliberately *not* used: it is salted per
process for ``str`` and therefore not reproducible across ranks.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch

from megatron_elastic.moe.routing_math import _check_k_range, _check_p, derive_seed, top_p_k  # noqa: F401

__all__ = [
    "SCHEDULES",
    "DISTRIBUTIONS",
    "derive_seed",
    "k_distribution",
    "top_p_k",  # lives in routing_math with the other pure routing functions
    "KSampler",
]

SCHEDULES = ("fixed", "batch", "microbatch", "layerwise", "top_p")
DISTRIBUTIONS = ("uniform", "weighted")

# Domain-separation tag so the seeds used to draw ``k`` never coincide with
# seeds another component derives from the same coordinates via derive_seed().
_K_DRAW_TAG = 0x4B5F5343484544  # ASCII "K_SCHED"


def _check_tau(tau: float) -> None:
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not math.isfinite(tau):
        raise ValueError(f"tau must be a finite positive number, got {tau!r}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")


def k_distribution(
    k_min: int, k_max: int, distribution: str = "uniform", tau: float = 1.0
) -> torch.Tensor:
    """Probabilities ``P(k)`` for ``k = k_min, ..., k_max`` (float64, sums to 1).

    ``uniform``:  ``P(k) = 1 / (k_max - k_min + 1)``.
    ``weighted``: ``P(k) ∝ exp(log(k) / tau) = k**(1/tau)`` -- capacity-aware:
    larger ``k`` (more compute, the configurations served most often) gets
    more training signal.  Normalised with a softmax over ``log(k)/tau`` so
    that very small ``tau`` does not overflow.

    ``tau`` is validated for both distributions so configuration typos surface
    early, but only ``weighted`` uses it.
    """
    _check_k_range(k_min, k_max)
    _check_tau(tau)
    ks = torch.arange(k_min, k_max + 1, dtype=torch.float64)
    if distribution == "uniform":
        return torch.full_like(ks, 1.0 / ks.numel())
    if distribution == "weighted":
        return torch.softmax(torch.log(ks) / tau, dim=0)
    raise ValueError(f"unknown k distribution {distribution!r}; expected one of {DISTRIBUTIONS}")


class KSampler:
    """Stateless, rank-consistent sampler of the number of activated experts.

    Args:
        schedule: one of ``fixed``, ``batch``, ``microbatch``, ``layerwise``,
            ``top_p`` (see module docstring).
        k_min, k_max: inclusive range of ``k``.
        distribution: ``uniform`` or ``weighted`` (``P(k) ∝ k**(1/tau)``).
        tau: temperature of the ``weighted`` distribution (> 0).
        top_p: mass threshold, required for (and only allowed with) the
            ``top_p`` schedule.
        seed: base seed; two samplers with equal arguments agree everywhere.
        fixed_k: the ``k`` of the ``fixed`` schedule (default ``k_max``);
            only allowed with ``fixed``.

    ``k_for(iteration, microbatch, layer)`` is a pure function of its
    arguments and the constructor arguments, so it can be called in any order,
    any number of times, on any rank.
    """

    def __init__(
        self,
        schedule: str,
        k_min: int,
        k_max: int,
        distribution: str = "uniform",
        tau: float = 1.0,
        top_p: Optional[float] = None,
        seed: int = 0,
        fixed_k: Optional[int] = None,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown k schedule {schedule!r}; expected one of {SCHEDULES}")
        # Validates k range, distribution name and tau for every schedule so a
        # typo is reported even where the value would be unused.
        self._probs = k_distribution(k_min, k_max, distribution, tau)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if schedule == "top_p":
            if top_p is None:
                raise ValueError("schedule 'top_p' requires top_p in (0, 1]")
            _check_p(top_p)
        elif top_p is not None:
            raise ValueError(f"top_p is only valid with schedule 'top_p', not {schedule!r}")
        if fixed_k is not None:
            if schedule != "fixed":
                raise ValueError(f"fixed_k is only valid with schedule 'fixed', not {schedule!r}")
            if isinstance(fixed_k, bool) or not isinstance(fixed_k, int):
                raise ValueError(f"fixed_k must be an int, got {fixed_k!r}")
            if not (k_min <= fixed_k <= k_max):
                raise ValueError(f"fixed_k={fixed_k} outside [k_min, k_max]=[{k_min}, {k_max}]")

        self.schedule = schedule
        self.k_min = k_min
        self.k_max = k_max
        self.distribution = distribution
        self.tau = float(tau)
        self.top_p = None if top_p is None else float(top_p)
        self.seed = seed
        self.fixed_k = fixed_k if fixed_k is not None else k_max
        # Inverse-CDF table (float64) used with one uniform draw per k.
        self._cdf = torch.cumsum(self._probs, dim=0)

    # ------------------------------------------------------------------ properties
    @property
    def per_token(self) -> bool:
        """True when ``k`` varies per token and is decided in the router (``top_p``).

        In that case :meth:`k_for` only returns ``k_max`` as an upper bound.
        """
        return self.schedule == "top_p"

    @property
    def is_random(self) -> bool:
        """True when :meth:`k_for` actually draws (``batch``/``microbatch``/``layerwise``)."""
        return self.schedule in ("batch", "microbatch", "layerwise")

    @property
    def ks(self) -> List[int]:
        """The support ``[k_min, ..., k_max]``."""
        return list(range(self.k_min, self.k_max + 1))

    @property
    def probs(self) -> torch.Tensor:
        """``P(k)`` over :attr:`ks` used by the random schedules (float64 copy)."""
        return self._probs.clone()

    @property
    def expected_k(self) -> float:
        """Mean ``k`` of the draws (``fixed_k`` for ``fixed``; ``k_max`` bound for ``top_p``)."""
        if self.schedule == "fixed":
            return float(self.fixed_k)
        if self.schedule == "top_p":
            return float(self.k_max)
        ks = torch.arange(self.k_min, self.k_max + 1, dtype=torch.float64)
        return float((ks * self._probs).sum())

    # ------------------------------------------------------------------ sampling
    def seed_for(self, iteration: int, microbatch: int = 0, layer: int = 0) -> Optional[int]:
        """The generator seed used for these coordinates (None if nothing is drawn).

        Coordinates irrelevant to the schedule's granularity are dropped
        *before* hashing, which is what makes ``batch`` identical across
        micro-batches and layers and ``microbatch`` identical across layers.
        """
        if self.schedule == "batch":
            return derive_seed(_K_DRAW_TAG, self.seed, iteration)
        if self.schedule == "microbatch":
            return derive_seed(_K_DRAW_TAG, self.seed, iteration, microbatch)
        if self.schedule == "layerwise":
            return derive_seed(_K_DRAW_TAG, self.seed, iteration, microbatch, layer)
        return None

    def k_for(self, iteration: int, microbatch: int = 0, layer: int = 0) -> int:
        """The ``k`` to use at (iteration, micro-batch, layer).

        ``layer`` may be any stable per-layer integer (e.g. Megatron's global
        1-based ``layer_number``) as long as every rank uses the same
        convention.  Returns ``fixed_k`` for ``fixed`` and ``k_max`` (buffer
        bound) for ``top_p``.
        """
        for name, v in (("iteration", iteration), ("microbatch", microbatch), ("layer", layer)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if self.schedule == "fixed":
            return self.fixed_k
        if self.schedule == "top_p":
            return self.k_max
        g = torch.Generator(device="cpu")
        g.manual_seed(self.seed_for(iteration, microbatch, layer))
        u = torch.rand((1,), generator=g, dtype=torch.float64)
        idx = int(torch.searchsorted(self._cdf, u, right=True).item())
        # Guard against cdf[-1] rounding to slightly below 1.0.
        idx = min(idx, self._cdf.numel() - 1)
        return self.k_min + idx

    def __repr__(self) -> str:
        extra = ""
        if self.schedule == "fixed":
            extra = f", fixed_k={self.fixed_k}"
        elif self.schedule == "top_p":
            extra = f", top_p={self.top_p}"
        return (
            f"KSampler(schedule={self.schedule!r}, k_min={self.k_min}, k_max={self.k_max}, "
            f"distribution={self.distribution!r}, tau={self.tau}, seed={self.seed}{extra})"
        )
