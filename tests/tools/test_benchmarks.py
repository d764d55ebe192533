"""The benchmark tools run end to end at toy size and report what they claim to measure."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from helpers import run_tool


def _bench_train_module():
    path = Path(__file__).resolve().parents[2] / "tools" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_drawn_work_ratio_charges_each_step_the_mean_fixed_cost_of_its_draws():
    # Step 1 drew k=1 and k=3 (fixed-k steps cost 1.0 s and 3.0 s: the drawn work costs 2.0 s)
    # and took 3.0 s; step 2 drew k=2 twice and took exactly the fixed-2 time.
    ratios = _bench_train_module().drawn_work_ratios([3.0, 2.0], [[1, 3], [2, 2]], {1: 1.0, 2: 2.0, 3: 3.0})
    assert ratios == [1.5, 1.0]


@pytest.mark.slow
@pytest.mark.multiproc
def test_bench_elastic_moe_ep2_counts_bytes_at_the_collective(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_tool("tools/bench_elastic_moe.py", "--ep", "2", "--tokens", "256", "--hidden", "32",
                    "--ffn", "32", "--experts", "8", "--iters", "2", "--warmup", "1", "--json", str(out))
    data = json.loads(out.read_text())
    cases = {c["case"]: c for c in data["cases"]}
    assert set(cases) == {"mcore_topk2", "elastic_fixed2", "elastic_layerwise[1,4]", "emoe_pool2of6",
                          "mcore_topk6", "elastic_fixed1", "elastic_fixed3", "elastic_fixed4"}
    # Dispatch all-to-all: k_l x hidden x 4 bytes per token, every step, pool or not.
    assert cases["elastic_fixed2"]["bytes_per_token"] == 2 * 32 * 4
    assert cases["emoe_pool2of6"]["bytes_per_token"] == 2 * 32 * 4
    assert cases["mcore_topk6"]["bytes_per_token"] == 6 * 32 * 4
    for j in (1, 3, 4):  # the layer-wise layer pinned to j sends j slots per token
        assert cases[f"elastic_fixed{j}"]["bytes_per_token"] == j * 32 * 4
        assert cases[f"elastic_fixed{j}"]["mean_k"] == j
    assert 0.2 < cases["elastic_layerwise[1,4]"]["vs_drawn_work"] < 5
    assert cases["elastic_layerwise[1,4]"]["vs_k_over_kmax_x_kmax"] > 0
    assert all(c["bytes_match_every_step"] for c in data["cases"])
    assert all(c["load_imbalance"] >= 1.0 for c in data["cases"])
    assert "bytes/token" in proc.stdout and "imbalance" in proc.stdout


@pytest.mark.slow
def test_bench_train_runs_every_case(tmp_path):
    out = tmp_path / "train.json"
    proc = run_tool("tools/bench_train.py", "--layers", "2", "--hidden", "32", "--ffn", "32",
                    "--experts", "8", "--seq", "32", "--vocab", "256", "--micro-batch", "2",
                    "--steps", "2", "--warmup", "1", "--json", str(out))
    data = json.loads(out.read_text())
    names = [c["case"] for c in data["cases"]]
    assert names == ["stock_top2", "elastic_fixed2", "emoe_pool2of4", "mmoe_layerwise[1,4]", "stock_top4",
                     "elastic_fixed1", "elastic_fixed3", "elastic_fixed4"]
    assert [c["mean_k"] for c in data["cases"][5:]] == [1, 3, 4]  # pinned draws
    assert data["cases"][0]["ratio"] == 1.0 and all(c["tokens_per_s"] > 0 for c in data["cases"])
    layerwise = data["cases"][3]
    assert layerwise["expected_k"] == 2.5 and 1 <= layerwise["mean_k"] <= 4
    assert "vs_linear_in_k" in layerwise and "layer-wise k" in proc.stdout
    assert 0.2 < layerwise["vs_drawn_work"] < 5 and layerwise["best_possible_vs_target"] > 0
    assert set(layerwise["fwd_bwd"]) == {"vs_drawn_work", "vs_drawn_work_range", "vs_target_Ek_over_kmax_x_topkmax",
                                         "vs_target_at_drawn_k", "vs_linear_in_k", "best_possible_vs_target"}
    assert all(0 < c["fwd_bwd_ms"] <= c["ms"] for c in data["cases"])
    assert "the work it drew" in proc.stdout
