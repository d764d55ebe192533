"""Greedy per-layer budget search (megatron_elastic/study/budget.py) on synthetic loss surfaces."""

from __future__ import annotations

import pytest

from megatron_elastic.eval.budget import budgets_for_targets, greedy_path


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


# ---------------------------------------------------------------------- on a trained model
@pytest.mark.slow
def test_search_budget_tool_and_hf_export_of_the_chosen_budget(smoke_data, tmp_path):
    """tools/search_budget.py on a tiny layer-wise model: the greedy path on the validation split,
    the chosen budget scored on the test split against uniform k' at equal FLOPs; then the
    budget recorded in a Hugging Face export and applied by load_elastic_hf."""
    import json

    from helpers import run_tool, tiny_overrides

    ckpt = tmp_path / "ckpt"
    overrides = tiny_overrides(smoke_data, tmp_path, **{
        "elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 3, "data.split": "80,10,10",
        "checkpoint.save": str(ckpt), "checkpoint.load": str(ckpt), "train.train_iters": 3})
    run_tool("-m", "megatron_elastic.train", "--config", "configs/smoke.yaml", *overrides, timeout=300)
    out = tmp_path / "budget.json"
    proc = run_tool("tools/search_budget.py", "--load", str(ckpt), "--mean-k", "1.5,2", "--eval-iters", "1",
                    "--output", str(out), "data.split=80,10,10", timeout=300)
    result = json.loads(out.read_text())
    path = result["path"]
    assert path[0]["budget"] == [1, 1] and result["k_range"] == [1, 4]  # 2 x the default k 3, capped at 4 experts
    assert [sum(p["budget"]) for p in path] == list(range(2, 2 + len(path)))  # +1 expert per step
    chosen = {b["target_mean_k"]: b for b in result["budgets"]}
    assert chosen[1.5]["mean_k"] == 1.5 and chosen[2.0]["mean_k"] == 2.0
    assert "test_loss" in chosen[2.0] and "uniform_test_loss_at_equal_flops" in chosen[2.0]
    budget = ",".join(map(str, chosen[2.0]["budget"]))
    assert f"--inference-k {budget}" in proc.stdout

    hf = tmp_path / "hf"
    run_tool("tools/convert_to_hf.py", "--load", str(ckpt), "--output", str(hf), "--inference-k", budget,
             "--no-progress", timeout=300)
    config = json.loads((hf / "config.json").read_text())
    assert config["elastic_moe"]["inference_k"] == chosen[2.0]["budget"]
    from megatron_elastic.convert.hf_elastic import get_hf_inference_k, load_elastic_hf

    assert get_hf_inference_k(load_elastic_hf(str(hf))) == chosen[2.0]["budget"]
    bad = run_tool("tools/convert_to_hf.py", "--load", str(ckpt), "--output", str(tmp_path / "hf2"),
                   "--inference-k", "9,1", "--no-progress", check=False, timeout=300)
    assert bad.returncode == 2 and "one k per MoE layer" in bad.stderr
