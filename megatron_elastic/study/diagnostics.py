"""Router diagnostics of one MoE layer at one inference k', from what its router recorded over
the evaluation tokens: the routing map ``[T, E]`` (bool) and the routing distribution
``[T, E]`` (each row sums to 1).

* ``expert_load``: share of routed slots per expert; its coefficient of variation (std/mean) and
  max/mean (1 and 1 = perfectly balanced).
* ``router_entropy``: mean over tokens of H(p) in nats (log E = uniform, 0 = one-hot).
* ``ranking_spearman``: mean over tokens of the Spearman correlation between the layer's router
  scores in two runs of the model (at k' and at k_train). The scores of a layer change with k'
  because the layers below it change; 1 = the expert ranking is unaffected.
* ``containment``: share of tokens whose top-k' set at this layer (in the k' run) lies inside
  its top-(k'+1) set in the k'+1 run (nested "Matryoshka" selections = 1).
* ``cooccurrence_distance``: Frobenius distance between two co-activation matrices
  C[i, j] = share of tokens activating both i and j (EMoE's predictor of the loss change).
"""

from __future__ import annotations

from typing import Dict

import torch

from megatron_elastic.moe.routing_math import expert_cooccurrence


def expert_load(routing_map: torch.Tensor) -> Dict[str, float]:
    counts = routing_map.float().sum(dim=0)
    share = counts / counts.sum().clamp(min=1.0)
    mean = share.mean()
    return {"load_cv": float(share.std(unbiased=False) / mean), "load_max_over_mean": float(share.max() / mean)}


def router_entropy(scores: torch.Tensor) -> float:
    p = scores.float().clamp(min=0)
    return float(-(p * torch.log(p.clamp(min=1e-30))).sum(dim=-1).mean())


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its row (0 = smallest); ties broken by position."""
    return x.argsort(dim=-1).argsort(dim=-1).float()


def ranking_spearman(scores_a: torch.Tensor, scores_b: torch.Tensor) -> float:
    """Mean per-token Spearman correlation between two score matrices of the same tokens."""
    if scores_a.shape != scores_b.shape:
        raise ValueError(f"score shapes differ: {tuple(scores_a.shape)} vs {tuple(scores_b.shape)}")
    ra, rb = _ranks(scores_a.float()), _ranks(scores_b.float())
    ra = ra - ra.mean(dim=-1, keepdim=True)
    rb = rb - rb.mean(dim=-1, keepdim=True)
    corr = (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1)).clamp(min=1e-12)
    return float(corr.mean())


def containment(map_k: torch.Tensor, map_k_plus_1: torch.Tensor) -> float:
    """Share of tokens whose selected set in ``map_k`` is a subset of the one in ``map_k_plus_1``."""
    if map_k.shape != map_k_plus_1.shape:
        raise ValueError(f"map shapes differ: {tuple(map_k.shape)} vs {tuple(map_k_plus_1.shape)}")
    outside = (map_k & ~map_k_plus_1).any(dim=-1)
    return float(1.0 - outside.float().mean())


def cooccurrence_distance(map_a: torch.Tensor, map_b: torch.Tensor) -> float:
    return float(torch.linalg.norm(expert_cooccurrence(map_a) - expert_cooccurrence(map_b)))
