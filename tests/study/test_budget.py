"""Greedy per-layer budget search (megatron_elastic/study/budget.py) on synthetic loss surfaces."""

from __future__ import annotations

import pytest

from megatron_elastic.study.budget import budgets_for_targets, greedy_path


def additive(gains):
    """loss = 10 - sum of per-layer gains for the k each layer has (gains[l][k-1] = total gain)."""
    calls = []

    def loss(budget):
        calls.append(tuple(budget))
        return 10.0 - sum(gains[l][k - 1] for l, k in enumerate(budget))

    return loss, calls


def flops(budget):
    return 100.0 + 10.0 * sum(budget)


def test_greedy_takes_the_largest_loss_drop_first_and_caches_evaluations():
    # Layer 0 gains a lot from its 2nd expert, layer 1 from its 3rd only a little.
    loss, calls = additive([[0, 1.0, 1.1, 1.15], [0, 0.2, 0.5, 0.55]])
    path = greedy_path(2, 1, 4, loss, flops, max_mean_k=3.0)
    # Marginal gains: layer 0 +1.0, +0.1, +0.05; layer 1 +0.2, +0.3, +0.05. Stops at mean k 3.
    assert [e["budget"] for e in path] == [[1, 1], [2, 1], [2, 2], [2, 3], [3, 3]]
    assert path[0]["loss"] == 10.0 and path[1]["loss"] == pytest.approx(9.0)
    assert path[-1]["mean_k"] == 3.0 and path[-1]["flops"] == 160.0
    assert len(calls) == len(set(calls))  # no budget measured twice


def test_greedy_stops_at_k_hi_and_divides_by_flops():
    loss, _ = additive([[0, 1, 2], [0, 0.1, 0.2]])

    def uneven(budget):  # layer 1's experts cost nothing extra: any gain per FLOP is huge
        return 100.0 + 10.0 * budget[0] + 1e-6 * budget[1]

    path = greedy_path(2, 1, 3, loss, uneven, max_mean_k=10)
    assert path[1]["budget"] == [1, 2]
    assert path[-1]["budget"] == [3, 3]


def test_budgets_for_targets_pick_the_first_budget_reaching_each_target():
    path = [{"budget": [1, 1], "mean_k": 1.0}, {"budget": [2, 1], "mean_k": 1.5},
            {"budget": [2, 2], "mean_k": 2.0}]
    assert budgets_for_targets(path, [1.25, 2.0, 3.0]) == {1.25: [2, 1], 2.0: [2, 2]}


def test_empty_k_range_is_refused():
    with pytest.raises(ValueError, match="empty"):
        greedy_path(2, 3, 2, lambda b: 0.0, flops, 2.0)
