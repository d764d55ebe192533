"""Elastic evaluation (tools/elastic_eval.py) and the four recipes.

* every recipe in configs/ loads, validates and describes what it reproduces;
* each recipe trains for a few iterations at a tiny size (keeping its own elastic section) and
  ``tools/elastic_eval.py`` on its checkpoint writes a table, JSON and PNG whose numbers hang
  together (all k' present, finite losses, ppl = exp(loss), co-occurrence distance 0 at k_train);
* argument errors (missing checkpoint, k' out of range, budget of the wrong length) exit with a
  one-line message, not a traceback.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from helpers import REPO, run_tool, tiny_overrides

RECIPES = ("topk", "mmoe_layerwise", "emoe", "elastic_combined")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _recipe(name: str) -> Path:
    return REPO / "configs" / f"{name}.yaml"


# ---------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_and_validates(name):
    from megatron_elastic.config import load_config, pool_size

    path = _recipe(name)
    cfg = load_config(path)
    smoke = load_config(REPO / "configs" / "smoke.yaml")
    # Smoke model size and batch shape.
    assert cfg.model == smoke.model
    assert (cfg.train.micro_batch_size, cfg.train.global_batch_size) == (
        smoke.train.micro_batch_size, smoke.train.global_batch_size)
    # Own run directory.
    for value in (cfg.checkpoint.save, cfg.checkpoint.load, cfg.logging.tensorboard_dir):
        assert value and Path(value).parts[:2] == ("runs", name), value
    # Documented at the top.
    header = path.read_text().splitlines()[0]
    assert header.startswith("#") and len(header) > 20
    e = cfg.elastic
    if name == "topk":
        assert (e.schedule, cfg.elastic_k_min, cfg.elastic_k_max) == ("fixed", 2, 2)
        assert e.pool_ratio is None and e.router_loss_coeff == 0
    elif name == "mmoe_layerwise":
        assert (e.schedule, e.k_min, e.k_max, e.distribution) == ("layerwise", 1, 4, "uniform")
        assert e.pool_ratio is None and e.router_loss_coeff == 0
    elif name == "emoe":
        assert (e.schedule, cfg.elastic_k_min, cfg.elastic_k_max) == ("fixed", 2, 2)
        assert e.pool_ratio == 2.0 and 1e-8 <= e.router_loss_coeff <= 1e-4
        assert "5e-4" in path.read_text() and "1e-8" in path.read_text()
    else:
        assert (e.schedule, e.k_min, e.k_max) == ("layerwise", 1, 4)
        assert e.pool_ratio == 2.0 and e.router_loss_coeff > 0
    if e.pool_ratio:
        assert pool_size(cfg.elastic_k_max, e.pool_ratio) <= cfg.model.num_moe_experts


def test_recipes_have_distinct_run_dirs():
    from megatron_elastic.config import load_config

    saves = {load_config(_recipe(n)).checkpoint.save for n in RECIPES}
    assert len(saves) == len(RECIPES)


# ---------------------------------------------------------------------- argument parsing
def test_parse_helpers():
    from megatron_elastic.eval.settings import EvalError, parse_budgets, parse_ks, parse_top_ps

    assert parse_ks("1,2,3,4") == [1, 2, 3, 4]
    assert parse_ks("3-5,1, 3") == [1, 3, 4, 5]
    assert parse_ks(None) is None and parse_ks("") is None
    assert parse_budgets("4,2;1,4") == [[4, 2], [1, 4]]
    assert parse_budgets("6,4,2,1") == [[6, 4, 2, 1]]
    assert parse_top_ps("0.5,0.9") == [0.5, 0.9]
    for bad in (lambda: parse_ks("two"), lambda: parse_ks("4-1"), lambda: parse_budgets("4,x"),
                lambda: parse_top_ps("high")):
        with pytest.raises(EvalError):
            bad()


def test_default_ks_cap_at_expert_count():
    from megatron_elastic.config import load_config
    from megatron_elastic.eval.settings import default_ks

    assert default_ks(load_config(_recipe("topk"))) == [1, 2, 3, 4]
    assert default_ks(load_config(_recipe("mmoe_layerwise"))) == list(range(1, 9))
    assert default_ks(load_config(_recipe("mmoe_layerwise"), ["model.num_moe_experts=6",
                                                              "model.moe_router_topk=2"])) == list(range(1, 7))


def _fake_checkpoint(tmp_path: Path, num_layers: int = 2, experts: int = 8) -> Path:
    """Just enough of a checkpoint for argument checks that fail before any weight is read."""
    from megatron_elastic.config import load_config, save_config

    ckpt = tmp_path / "ckpt" / "iter_0000001"
    ckpt.mkdir(parents=True)
    (ckpt / "metadata.json").write_text("{}")
    cfg = load_config(_recipe("mmoe_layerwise"), [f"model.num_layers={num_layers}",
                                                 f"model.num_moe_experts={experts}"])
    save_config(cfg, ckpt / "run_config.yaml")
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("1\n")
    return tmp_path / "ckpt"


def _main(argv, capsys):
    from megatron_elastic.eval.cli import main

    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_error_missing_checkpoint(tmp_path, capsys):
    rc, _, err = _main(["--load", str(tmp_path / "nope")], capsys)
    assert rc == 2 and "no such checkpoint" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = _main(["--load", str(tmp_path / "empty")], capsys)
    assert rc == 2 and "no checkpoint found" in err


def test_error_k_out_of_range(tmp_path, capsys):
    ckpt = _fake_checkpoint(tmp_path)
    rc, _, err = _main(["--load", str(ckpt), "--ks", "1,9"], capsys)
    assert rc == 2 and "k'=9" in err and "[1, num_moe_experts=8]" in err
    rc, _, err = _main(["--load", str(ckpt), "--ks", "0"], capsys)
    assert rc == 2 and "k'=0" in err
    rc, _, err = _main(["--load", str(ckpt), "--top-p", "1.5"], capsys)
    assert rc == 2 and "top-p 1.5" in err


def test_error_budget_wrong_length(tmp_path, capsys):
    ckpt = _fake_checkpoint(tmp_path, num_layers=2)
    rc, _, err = _main(["--load", str(ckpt), "--budgets", "6,4,2,1"], capsys)
    assert rc == 2 and "lists 4 values" in err and "2 MoE layers" in err
    rc, _, err = _main(["--load", str(ckpt), "--budgets", "4,12"], capsys)
    assert rc == 2 and "k=12" in err


def test_routing_statistics_leave_padding_out():
    """Rows are sequence-major ([s, b] flattened): with b=2, s=3 and the second sample padded
    from position 1, the first from position 2, only (s0,b0), (s0,b1), (s1,b0) are data."""
    import torch

    from megatron_elastic.eval.sweep import data_token_rows

    routing_map = torch.arange(6).unsqueeze(1).expand(6, 4) % 4 == torch.arange(4)
    pad = torch.tensor([[False, False, True], [False, True, True]])
    assert torch.equal(data_token_rows(routing_map, {"padding_mask": pad}), routing_map[[0, 1, 2]])
    assert data_token_rows(routing_map, {}) is routing_map  # text data: every row is data


def test_multi_process_eval_drops_pipeline_stages_and_refuses_them_when_asked(tmp_path, capsys, monkeypatch):
    """The sweep tallies routing per MoE layer on each rank's model: a multi-process launch
    evaluates without pipeline stages (the saved PP x VP layout reshards) and refuses an explicit
    request for them before anything is initialised."""
    from megatron_elastic.config import load_config, save_config
    from megatron_elastic.eval.cli import load_for_eval

    ckpt = _fake_checkpoint(tmp_path, num_layers=4)
    saved = ckpt / "iter_0000001" / "run_config.yaml"
    save_config(load_config(saved, ["parallel.pipeline_model_parallel_size=2",
                                    "parallel.virtual_pipeline_model_parallel_size=2"]), saved)
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = {}

    def stop_before_init(cfg):
        seen["layout"] = (cfg.parallel.pipeline_model_parallel_size, cfg.parallel.virtual_pipeline_model_parallel_size)
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        load_for_eval(ckpt, None, [], check_request=stop_before_init)
    assert seen["layout"] == (1, None)
    rc, _, err = _main(["--load", str(ckpt), "parallel.pipeline_model_parallel_size=2"], capsys)
    assert rc == 2 and "pipeline_model_parallel_size=2" in err and "without pipeline stages" in err


def test_error_bad_override(tmp_path, capsys):
    ckpt = _fake_checkpoint(tmp_path)
    rc, _, err = _main(["--load", str(ckpt), "model.num_layerz=3"], capsys)
    assert rc == 2 and "num_layers" in err


# ---------------------------------------------------------------------- reporting without a model
def _synthetic_results() -> dict:
    def entry(kind, loss, mean_k, k=None, budget=None, top_p=None, dist=0.0):
        return {"name": f"{kind}", "kind": kind, "k": k, "budget": budget, "top_p": top_p,
                "k_per_layer": budget or ([k, k] if k else None), "mean_k_per_layer": [mean_k, mean_k],
                "mean_k": mean_k, "loss": loss, "ppl": math.exp(loss), "tokens": 64, "seconds": 0.1,
                "delta_loss": loss - 3.0, "cooc_dist": dist, "cooc_dist_per_layer": [dist, dist],
                "cooc_dist_train": dist, "cooc_dist_train_per_layer": [dist, dist], "is_k_train": k == 2}

    results = [entry("k", 3.0 + abs(k - 2) * 0.1, k, k=k, dist=abs(k - 2) * 0.5) for k in (1, 2, 3, 4)]
    results.append(entry("budget", 3.05, 1.5, budget=[2, 1], dist=0.3))
    results.append(entry("top_p", 3.01, 1.7, top_p=0.5, dist=0.2))
    return {
        "model": {"num_moe_layers": 2, "num_moe_experts": 4},
        "elastic": {"schedule": "layerwise", "k_min": 1, "k_max": 2, "pool_ratio": 2.0, "router_loss_coeff": 1e-4},
        "eval": {"tokens": 64, "eval_iters": 1, "global_batch_size": 2},
        "reference": results[1], "train_routing": entry("train", 3.2, 1.5, dist=0.4), "results": results,
        "checkpoint": "ckpt/iter_0000001", "iteration": 1,
    }


def test_table_json_plot_from_results(tmp_path):
    from megatron_elastic.eval.report import write_outputs

    results = _synthetic_results()
    results["results"][0]["ppl"] = float("inf")  # non-finite numbers must not break strict JSON
    paths = write_outputs(results, tmp_path / "out")
    table = paths["txt"].read_text()
    assert "setting" in table and "||dM||_F" in table and "train" in table
    assert table.count("\n") >= 2 + len(results["results"])
    data = json.loads(paths["json"].read_text())
    assert data["results"][0]["ppl"] is None
    blob = paths["png"].read_bytes()
    assert blob[:8] == PNG_MAGIC and len(blob) > 10_000


# ---------------------------------------------------------------------- end to end
def _train_tiny(recipe: str, smoke_data: dict, run_dir: Path, iters: int = 3) -> str:
    """Train ``recipe`` at a tiny size with its own elastic section; return the trainer's stdout."""
    overrides = [o for o in tiny_overrides(smoke_data, run_dir) if not o.startswith("elastic.")]
    overrides += [
        "model.num_moe_experts=8",  # room for the pool: ceil(2 * k_max=4) = 8
        f"train.train_iters={iters}",
        f"checkpoint.save={run_dir / 'ckpt'}",
        f"checkpoint.load={run_dir / 'ckpt'}",
    ]
    proc = run_tool("-m", "megatron_elastic.train", "--config", str(_recipe(recipe)), *overrides, timeout=300)
    return proc.stdout


@pytest.fixture(scope="module")
def trained(smoke_data, tmp_path_factory):
    """``trained(recipe)`` -> (run dir, trainer stdout); each recipe is trained once per module."""
    cache = {}

    def get(recipe: str):
        if recipe not in cache:
            run_dir = tmp_path_factory.mktemp(f"train_{recipe}")
            cache[recipe] = (run_dir, _train_tiny(recipe, smoke_data, run_dir))
        return cache[recipe]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_elastic_eval_on_recipe_checkpoint(recipe, trained, tmp_path, capsys):
    from megatron_elastic.config import load_config

    run_dir, stdout = trained(recipe)
    final_valid = float(stdout.rsplit("final validation loss", 1)[1].split()[0])
    ckpt = run_dir / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").is_file()
    cfg = load_config(_recipe(recipe))
    budgets = "4,1;1,4"
    out = tmp_path / "eval"
    proc = run_tool("tools/elastic_eval.py", "--load", str(ckpt), "--output-dir", str(out),
                    "--budgets", budgets, "--top-p", "0.5,0.9", "data.split=90,10,0", timeout=300)

    # Table: printed and written.
    table = (out / "elastic_eval.txt").read_text()
    assert table in proc.stdout
    k_max = max(cfg.elastic_k_max, cfg.model.moe_router_topk)
    expected_ks = list(range(1, min(2 * k_max, 8) + 1))
    for k in expected_ks:
        assert f"k'={k}" in table
    assert "budget 4,1" in table and "budget 1,4" in table and "top-p 0.5" in table

    # JSON.
    data = json.loads((out / "elastic_eval.json").read_text())
    assert data["ks"] == expected_ks
    by_k = {e["k"]: e for e in data["results"] if e["kind"] == "k"}
    assert sorted(by_k) == expected_ks
    assert len(data["results"]) == len(expected_ks) + 2 + 2
    for e in data["results"] + [data["reference"], data["train_routing"]]:
        assert math.isfinite(e["loss"]) and 0 < e["loss"] < 20, e
        assert e["ppl"] == pytest.approx(math.exp(e["loss"]), rel=1e-9)
        assert e["cooc_dist"] >= 0 and math.isfinite(e["cooc_dist"])
        assert e["tokens"] == data["eval"]["tokens"] > 0
    k_train = cfg.elastic_k_max  # fixed: the one trained k (k_min == k_max); varying: k_max
    assert data["k_train"] == k_train and data["k_train_per_layer"] == [k_train] * 2
    ref = by_k[k_train]
    assert ref["is_k_train"] and ref["cooc_dist"] == 0.0 and ref["delta_loss"] == 0.0
    assert sum(e["is_k_train"] for e in data["results"]) == 1
    # The checkpoint's default k reproduces the trainer's own validation loss (same batches).
    assert ref["loss"] == pytest.approx(final_valid, abs=2e-5)
    # Measured k = requested k (dropless routing), for global k' and per-layer budgets.
    for k, e in by_k.items():
        assert e["mean_k_per_layer"] == pytest.approx([k, k], abs=1e-6)
        if k != k_train:
            assert e["cooc_dist"] > 0
    for e in data["results"]:
        if e["kind"] == "budget":
            assert e["k_per_layer"] == e["budget"]
            assert e["mean_k_per_layer"] == pytest.approx(e["budget"], abs=1e-6)
        if e["kind"] == "top_p":  # per-token k within [1, num_experts], not the trained range
            assert all(1 - 1e-6 <= k <= cfg.model.num_moe_experts + 1e-6 for k in e["mean_k_per_layer"]), e
    # Co-occurrence of the reference: symmetric, diagonal sums to k_train per layer.
    for layer in data["reference_cooccurrence"]:
        assert sum(layer[i][i] for i in range(8)) == pytest.approx(k_train, abs=1e-4)
        assert all(layer[i][j] == pytest.approx(layer[j][i]) for i in range(8) for j in range(8))
    train = data["train_routing"]
    if recipe == "topk":
        # Plain top-k: training routing is evaluation routing at k_train.
        assert train["cooc_dist"] == pytest.approx(0.0, abs=1e-9)
        assert train["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    elif recipe == "emoe":
        # Candidate-pool sampling activates other pairs than top-2, still 2 experts per token.
        assert train["cooc_dist"] > 0 and train["mean_k"] == pytest.approx(2.0)
        assert ref["cooc_dist_train"] > 0
    # Top-p is not clipped to the trained k range: even a fixed-k model's tokens take different k
    # (p = 0.5 and 0.9 select different numbers of experts on an untrained-ish router).
    top_p_means = [e["mean_k"] for e in data["results"] if e["kind"] == "top_p"]
    assert len(set(top_p_means)) == 2 and max(top_p_means) > cfg.elastic_k_min

    # Plot.
    blob = (out / "elastic_eval.png").read_bytes()
    assert blob[:8] == PNG_MAGIC and len(blob) > 20_000

    # Errors against the real checkpoint: exit code 2 and one line naming the problem.
    rc, _, err = _main(["--load", str(ckpt), "--budgets", "4,4,4"], capsys)
    assert rc == 2 and "lists 3 values" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_elastic_eval_checkpoint_iter_dir_and_explicit_config(trained, tmp_path):
    """--load may name one iter_N directory; --config replaces the checkpoint's run_config."""
    run_dir, _ = trained("topk")
    iter_dir = run_dir / "ckpt" / "iter_0000003"
    cfg_path = tmp_path / "eval_config.yaml"
    saved = yaml.safe_load((iter_dir / "run_config.yaml").read_text())
    saved["train"]["micro_batch_size"] = 1  # observable: 4 micro-batches per global batch
    cfg_path.write_text(yaml.safe_dump(saved))
    proc = run_tool("tools/elastic_eval.py", "--load", str(iter_dir), "--config", str(cfg_path),
                    "--ks", "1,3", "--eval-iters", "2", "--no-train-reference", timeout=300)
    out = run_dir / "ckpt" / "elastic_eval" / "iter_0000003"  # default output directory
    data = json.loads((out / "elastic_eval.json").read_text())
    assert data["ks"] == [1, 3] and data["eval"]["eval_iters"] == 2 and data["train_routing"] is None
    assert data["eval"]["micro_batch_size"] == 1
    assert data["eval"]["tokens"] == 2 * saved["train"]["global_batch_size"] * saved["model"]["seq_length"]
    assert data["iteration"] == 3 and data["checkpoint"] == str(iter_dir)
    # k_train = 2 is not among --ks: it is still measured as the reference and listed.
    assert data["reference"]["k"] == 2 and "k'=2 *" in proc.stdout
    assert all(not e["is_k_train"] for e in data["results"])
