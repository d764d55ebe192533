"""The benchmark tools run end to end at toy size and report what they claim to measure."""

from __future__ import annotations

import json

import pytest

from helpers import run_tool


@pytest.mark.slow
@pytest.mark.multiproc
def test_bench_elastic_moe_ep2_counts_bytes_at_the_collective(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_tool("tools/bench_elastic_moe.py", "--ep", "2", "--tokens", "256", "--hidden", "32",
                    "--ffn", "32", "--experts", "8", "--iters", "2", "--warmup", "1", "--json", str(out))
    data = json.loads(out.read_text())
    cases = {c["case"]: c for c in data["cases"]}
    assert set(cases) == {"mcore_topk2", "elastic_fixed2", "elastic_layerwise[1,4]", "emoe_pool2of6",
                          "mcore_topk6"}
    # Dispatch all-to-all: k_l x hidden x 4 bytes per token, every step, pool or not.
    assert cases["elastic_fixed2"]["bytes_per_token"] == 2 * 32 * 4
    assert cases["emoe_pool2of6"]["bytes_per_token"] == 2 * 32 * 4
    assert cases["mcore_topk6"]["bytes_per_token"] == 6 * 32 * 4
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
    assert names == ["stock_top2", "elastic_fixed2", "emoe_pool2of4", "mmoe_layerwise[1,4]", "stock_top4"]
    assert data["cases"][0]["ratio"] == 1.0 and all(c["tokens_per_s"] > 0 for c in data["cases"])
    layerwise = data["cases"][3]
    assert layerwise["expected_k"] == 2.5 and 1 <= layerwise["mean_k"] <= 4
    assert "vs_linear_in_k" in layerwise and "layer-wise k" in proc.stdout
