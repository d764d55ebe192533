"""The study runner end to end on configs/study/toy.yaml (both protocols, two arms, a handful of
steps): data, training through the normal trainer, evaluation, report; then what a second
sitting sees: finished runs skipped, a run whose result was removed re-evaluated without
retraining, and a result from another spec refused."""

from __future__ import annotations

import json

import pytest

from helpers import run_tool

pytestmark = pytest.mark.slow


def test_toy_study_runs_resumes_and_refuses_stale_results(tmp_path):
    work, results = tmp_path / "work", tmp_path / "results"
    args = ["tools/elastic_study.py", "run", "--spec", "configs/study/toy.yaml", "--work-dir", str(work),
            "--results-dir", str(results)]
    first = run_tool(*args)
    assert "5 runs, 0 already done" in first.stdout
    runs = sorted(p.name for p in (results / "runs").glob("*.json"))
    assert runs == ["continue__base_k2__seed0.json", "continue__k2__seed1.json",
                    "continue__mmoe_layerwise__seed1.json", "scratch__k2__seed1.json",
                    "scratch__mmoe_layerwise__seed1.json"]
    r = json.loads((results / "runs" / "scratch__mmoe_layerwise__seed1.json").read_text())
    assert sorted(r["loss"]["test"]) == ["1", "2", "3"] and r["k_ref"] == 3
    assert r["train"]["train_iters"] == 6 and len(r["train"]["mean_k_per_layer"]) == 2
    assert 1 <= sum(r["train"]["mean_k_per_layer"]) / 2 <= 3 and r["train"]["train_flops"] > 0
    assert set(r["diagnostics"]["1"]["mean"]) >= {"load_cv", "entropy", "spearman_vs_ref", "containment_in_next"}
    assert r["budget_search"]["budgets"][0]["mean_k"] >= 1.5
    # Every arm is scored on the same held-out tokens.
    toks = {json.loads(p.read_text())["eval"]["tokens_per_setting"] for p in (results / "runs").glob("*.json")}
    assert len(toks) == 1
    # The continued arm started from the base's weights.
    cont = json.loads((work / "continue" / "k2" / "seed1" / "train_summary.json").read_text())
    assert cont["base_checkpoint"].endswith("continue/base_k2/seed0/checkpoints")
    assert "finetune=true" in (work / "continue" / "k2" / "seed1" / "train.log").read_text()
    md = (results / "report.md").read_text()
    assert "## Protocol: scratch" in md and "## Protocol: continue" in md
    assert (results / "loss_vs_k_continue.png").stat().st_size > 1000

    # Second sitting: a removed result is re-evaluated, nothing is retrained.
    (results / "runs" / "scratch__k2__seed1.json").unlink()
    second = run_tool(*args)
    assert "5 runs, 4 already done" in second.stdout
    assert "[eval] scratch__k2__seed1" in second.stdout and "[train]" not in second.stdout

    # A result made under another spec is refused, naming what to remove.
    path = results / "runs" / "scratch__k2__seed1.json"
    data = json.loads(path.read_text())
    data["run"]["fingerprint"] = "0" * 16
    path.write_text(json.dumps(data))
    third = run_tool(*args, check=False)
    assert third.returncode == 2
    assert "holds a result for another spec" in third.stderr and "remove it" in third.stderr

    report = run_tool("tools/elastic_study.py", "report", "--spec", "configs/study/toy.yaml",
                      "--work-dir", str(work), "--results-dir", str(tmp_path / "empty"))
    assert "wrote" in report.stdout
