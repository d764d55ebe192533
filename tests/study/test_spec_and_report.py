"""Study spec checks, train-log parsing and the report's arithmetic (envelope, gaps, scaling
wall, budget vs uniform, claims) on synthetic per-run results with hand-checked values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_elastic.study.report import aggregate, claims, markdown, uniform_at, write_report
from megatron_elastic.study.runner import parse_train_log
from megatron_elastic.study.spec import StudyError, load_study

RECIPE = "model: {num_layers: 2}\n"


def write_spec(tmp_path: Path, text: str) -> Path:
    (tmp_path / "m.yaml").write_text(RECIPE)
    path = tmp_path / "s.yaml"
    path.write_text("recipe: m.yaml\nwork_dir: w\nresults_dir: r\n" + text)
    return path


SPEC = """
seeds: [1, 2]
protocols:
  scratch: {train_iters: 5, arms: [k1, k2, lw]}
  continue: {base: k2, base_iters: 4, train_iters: 3, arms: [k2, lw], overrides: [train.lr=1e-3]}
arms:
  k1: {overrides: [model.moe_router_topk=1]}
  k2: {overrides: [model.moe_router_topk=2]}
  lw: {overrides: [elastic.schedule=layerwise, elastic.k_min=1, elastic.k_max=2]}
"""


def test_runs_order_base_first_and_overrides_layer(tmp_path):
    study = load_study(write_spec(tmp_path, SPEC))
    runs = study.runs()
    assert [r.key for r in runs][:3] == ["continue__base_k2__seed0", "continue__k2__seed1", "continue__k2__seed2"]
    assert len(runs) == 1 + 2 * 2 + 3 * 2
    base, cont, scratch = runs[0], runs[1], runs[-1]
    assert study.run_overrides(base) == ["model.moe_router_topk=2"]  # the protocol's lr is for arms only
    assert study.run_overrides(cont) == ["train.lr=1e-3", "model.moe_router_topk=2"]
    assert scratch.protocol == "scratch" and scratch.train_iters == 5
    # A continued arm's fingerprint follows its base's.
    before = study.fingerprint(cont)
    study.protocols["continue"].base_iters = 8
    assert study.fingerprint(cont) != before and study.fingerprint(scratch) == study.fingerprint(scratch)


@pytest.mark.parametrize("text, message", [
    ("seeds: []\nprotocols: {}\narms: {}\n", "seeds must be a non-empty list"),
    ("seeds: [1, 1]\n", "repeat"),
    ("seeds: [1]\nprotocols: {scratch: {train_iters: 5, arms: [nope]}}\narms: {}\n", "undefined: \\['nope'\\]"),
    ("seeds: [1]\nprotocols: {later: {train_iters: 5, arms: [a]}}\narms: {a: {overrides: []}}\n",
     "protocol 'later' is not one of"),
    ("seeds: [1]\nprotocols: {continue: {train_iters: 5, arms: [a]}}\narms: {a: {overrides: []}}\n",
     "protocols.continue.base must name an arm"),
    ("seeds: [1]\nprotocols: {scratch: {train_iters: 5, arms: [a]}}\narms: {a: {overrides: [lr]}}\n",
     "arms.a.overrides must be a list of section.key=value"),
    ("seeds: [1]\nbogus: 1\n", "unknown key"),
])
def test_bad_specs_name_the_key(tmp_path, text, message):
    with pytest.raises(StudyError, match=message):
        load_study(write_spec(tmp_path, text))


def test_parse_train_log_keeps_the_last_line_per_iteration_and_means_k():
    log = "\n".join([
        "iter      1/3 | loss 5.0 | lr 1e-3 | grad_norm 1 | tokens/s 100 | k 1,2",
        "iter      2/3 | loss 4.0 | lr 1e-3 | grad_norm 1 | tokens/s 200 | k 3,2 | load_balancing_loss 1.0",
        "resumed from x at iteration 1",
        "iter      2/3 | loss 4.5 | lr 1e-3 | grad_norm 1 | tokens/s 50 | k 3,4 | load_balancing_loss 1.0",
        "iter      3/3 | loss 3.0 | lr 1e-3 | grad_norm 1 | tokens/s 100 | k 2,3",
    ])
    out = parse_train_log(log, tokens_per_iter=100)
    assert out["iterations_logged"] == 3 and out["last_iteration"] == 3
    assert out["mean_k_per_layer"] == [2.0, 3.0]  # (1+3+2)/3, (2+4+3)/3
    assert out["step_seconds"] == 1.0 + 2.0 + 1.0
    assert out["train_loss_last10pct"] == 3.0


# ---------------------------------------------------------------------- report arithmetic
def result(protocol, arm, seed, test, k_ref, schedule="fixed", k_max=None, pool=None, budgets=()):
    ks = sorted(test)
    return {
        "run": {"protocol": protocol, "arm": arm, "seed": seed, "description": arm},
        "k_ref": k_ref,
        "elastic": {"schedule": schedule, "k_min": 1 if schedule != "fixed" else k_ref,
                    "k_max": k_max or k_ref, "pool_ratio": pool},
        "loss": {"test": {str(k): v for k, v in test.items()}, "valid": {str(k): v for k, v in test.items()}},
        "flops_per_token": {str(k): 100.0 * k for k in ks},
        "diagnostics": {str(k): {"mean": {"load_cv": 0.1 * k, "cooc_dist_to_ref": abs(k - k_ref)}} for k in ks},
        "budget_search": {"budgets": [{"target_mean_k": 1.5, "budget": [2, 1], "mean_k": 1.5, "test_loss": b,
                                       "flops": 150.0} for b in budgets]} if budgets else None,
        "train": {"train_flops": 1e12, "mean_k_per_layer": [k_ref, k_ref], "train_wall_s": 10.0},
    }


def synthetic(tmp_path):
    study = load_study(write_spec(tmp_path, SPEC))
    rows = [
        result("scratch", "k1", 1, {1: 4.0, 2: 4.1, 3: 4.2}, 1),
        result("scratch", "k1", 2, {1: 4.2, 2: 4.3, 3: 4.4}, 1),
        result("scratch", "k2", 1, {1: 4.5, 2: 3.9, 3: 3.95}, 2),
        result("scratch", "k2", 2, {1: 4.5, 2: 3.9, 3: 3.97}, 2),
        result("scratch", "lw", 1, {1: 4.1, 2: 3.95, 3: 3.9}, 2, "layerwise", 2, budgets=[4.0]),
        result("scratch", "lw", 2, {1: 4.1, 2: 3.95, 3: 3.9}, 2, "layerwise", 2, budgets=[4.1]),
    ]
    return study, rows


def test_aggregate_envelope_gap_wall_and_budget(tmp_path):
    study, rows = synthetic(tmp_path)
    agg = aggregate(study, rows)["scratch"]
    k1, k2, lw = (agg["arms"][n] for n in ("k1", "k2", "lw"))
    assert k1["test"][1]["mean"] == pytest.approx(4.1) and k1["test"][1]["spread"] == pytest.approx(0.1)
    assert {k: e["arm"] for k, e in agg["envelope"].items()} == {1: "k1", 2: "k2"}
    assert lw["gap_to_specialist_pct"][1] == pytest.approx(0.0)
    assert lw["gap_to_specialist_pct"][2] == pytest.approx(100 * 0.05 / 3.9)
    assert k2["scaling_wall"][3]["mean"] == pytest.approx(0.06)
    assert k2["scaling_wall"][3]["per_seed"] == pytest.approx([0.05, 0.07])
    # Budget at mean k 1.5 vs uniform: halfway between k'=1 (4.1) and k'=2 (3.95) = 4.025.
    assert uniform_at(lw, 1.5) == pytest.approx(4.025)
    assert lw["budget_vs_uniform"][1.5]["delta"] == pytest.approx(4.05 - 4.025)
    assert uniform_at(lw, 7) is None


def test_claims_state_the_numbers(tmp_path):
    study, rows = synthetic(tmp_path)
    found = {c["claim"]: c for c in claims(aggregate(study, rows))}
    wall = found["Top-k degrades beyond k_train (a scaling wall)"]
    assert wall["holds"] is True and "k'=3: +0.0600 (+0.0500, +0.0700)" in wall["evidence"]
    lw = found["M-MoE layer-wise (lw) within ~1% of each specialist across its range"]
    assert lw["holds"] is False and "k=2: +1.28%" in lw["evidence"]
    budget = found["budget search beats uniform k' at equal FLOPs (lw, mean k 1.5)"]
    assert budget["holds"] is False


def test_write_report_from_stored_files(tmp_path):
    study, rows = synthetic(tmp_path)
    (study.results_dir / "runs").mkdir(parents=True)
    for r in rows:
        (study.results_dir / "runs" / f"{r['run']['protocol']}__{r['run']['arm']}__seed{r['run']['seed']}.json"
         ).write_text(json.dumps(r))
    paths = write_report(study)
    names = {p.name for p in paths}
    assert {"report.md", "results.json", "loss_vs_k_scratch.png", "pareto_scratch.png",
            "cooc_vs_loss_scratch.png", "train_cost_scratch.png"} <= names
    md = (study.results_dir / "report.md").read_text()
    assert "| k2 | 2 | 4.5000 ±0.0000 | 3.9000 ±0.0000* | 3.9600 ±0.0100 |" in md
    assert "| *specialists' envelope* | | 4.1000 ±0.1000 | 3.9000 ±0.0000 | - |" in md
    assert "## The papers' claims at this scale" in md
    assert markdown(study, {}, []).startswith("# s")
