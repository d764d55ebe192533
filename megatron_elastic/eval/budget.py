"""Per-layer budget search: which k per MoE layer minimises the loss at a given mean k.

Greedy by marginal loss gain per FLOP. Start with every layer at ``k_lo``; at each step try one
more expert in each layer that can still grow, measure the loss on the calibration data, and
keep the step with the largest loss drop per added forward FLOP (in a model whose MoE layers
are alike every +1 costs the same, so this is the largest drop). The path of budgets it walks
serves every target mean k at once: the budget for a target is the first one on the path whose
mean k reaches it. Cost: at most L evaluations per step, (k_hi - k_lo) x L steps.

``loss_of(budget) -> float`` evaluates one budget (a list of one k per layer, depth order);
``flops_of(budget) -> float`` its forward FLOPs per token. Both are injected, so the search is
tested on synthetic loss surfaces and run on a model by ``eval/budget_cli.py`` (tools/search_budget.py)
and ``study/evaluate.py``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

Budget = Tuple[int, ...]


def greedy_path(num_layers: int, k_lo: int, k_hi: int, loss_of: Callable[[List[int]], float],
                flops_of: Callable[[List[int]], float], max_mean_k: float) -> List[dict]:
    """The greedy path from ``[k_lo] * L`` up to mean k ``max_mean_k`` (or every layer at
    ``k_hi``): one entry per budget visited, ``{"budget", "mean_k", "loss", "flops"}``."""
    if not 1 <= k_lo <= k_hi:
        raise ValueError(f"k range [{k_lo}, {k_hi}] is empty")
    cache: Dict[Budget, float] = {}

    def measure(b: Budget) -> float:
        if b not in cache:
            cache[b] = float(loss_of(list(b)))
        return cache[b]

    current: Budget = tuple([k_lo] * num_layers)
    path = [_entry(current, measure(current), flops_of)]
    while sum(current) / num_layers < max_mean_k and any(k < k_hi for k in current):
        best = None
        base_loss, base_flops = measure(current), flops_of(list(current))
        for layer in range(num_layers):
            if current[layer] >= k_hi:
                continue
            cand = current[:layer] + (current[layer] + 1,) + current[layer + 1:]
            gain = (base_loss - measure(cand)) / max(flops_of(list(cand)) - base_flops, 1e-12)
            if best is None or gain > best[0]:
                best = (gain, cand)
        current = best[1]
        path.append(_entry(current, measure(current), flops_of))
    return path


def _entry(budget: Budget, loss: float, flops_of) -> dict:
    return {"budget": list(budget), "mean_k": sum(budget) / len(budget), "loss": loss,
            "flops": float(flops_of(list(budget)))}


def budgets_for_targets(path: Sequence[dict], targets: Sequence[float]) -> Dict[float, List[int]]:
    """For each target mean k, the first budget on the path that reaches it."""
    out = {}
    for target in targets:
        for entry in path:
            if entry["mean_k"] >= target - 1e-9:
                out[target] = list(entry["budget"])
                break
    return out
