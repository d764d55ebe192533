"""Elastic k has one source of truth: the config's derived values, read by the model, the
evaluation and the Hugging Face export alike."""

from __future__ import annotations

import json

import pytest

from helpers import REPO, run_tool, tiny_overrides

from megatron_elastic.config import load_config

RECIPES = {
    "topk": ("topk.yaml", {"elastic.k_min": 3, "elastic.k_max": 3}, 3, 3),
    "topk_via_router_topk": ("topk.yaml", {"model.moe_router_topk": 3, "elastic.k_min": "null",
                                          "elastic.k_max": "null"}, 3, 3),
    "layerwise": ("mmoe_layerwise.yaml", {"elastic.k_min": 1, "elastic.k_max": 3}, 3, 3),
    "emoe": ("emoe.yaml", {"elastic.k_min": 3, "elastic.k_max": 3, "elastic.pool_ratio": 1.0}, 3, 3),
    "batch": ("mmoe_layerwise.yaml", {"elastic.schedule": "batch", "elastic.k_min": 1, "elastic.k_max": 3}, 3, 3),
    "microbatch": ("mmoe_layerwise.yaml", {"elastic.schedule": "microbatch", "elastic.k_min": 1,
                                           "elastic.k_max": 3}, 3, 3),
    "top_p": ("mmoe_layerwise.yaml", {"elastic.schedule": "top_p", "elastic.top_p": 0.5, "elastic.k_min": 1,
                                      "elastic.k_max": 3}, 3, 3),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_derived_k_values(name):
    recipe, extra, k_train, default = RECIPES[name]
    cfg = load_config(REPO / "configs" / recipe, [f"{k}={v}" for k, v in extra.items()])
    assert cfg.k_train == k_train and cfg.default_eval_k == default
    assert cfg.buffer_k == max(cfg.model.moe_router_topk, cfg.elastic_k_max)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["topk", "layerwise", "batch", "microbatch", "top_p"])
def test_export_states_the_k_training_used(smoke_data, tmp_path, name):
    """topk.yaml with elastic.k_min=k_max=3 trains at 3, and config.json says 3 wherever it
    states a training or default k (it said 2, model.moe_router_topk, before)."""
    recipe, extra, k_train, default = RECIPES[name]
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    overrides = tiny_overrides(smoke_data, tmp_path, **{
        "train.train_iters": 2, "checkpoint.save": str(ckpt), "model.moe_router_topk": 2,
        "elastic.schedule": "fixed" if name == "topk" else "layerwise", "elastic.pool_ratio": "null",
        **extra})
    run_tool("-m", "megatron_elastic.train", "--config", str(REPO / "configs" / recipe), *overrides)
    run_tool("tools/convert_to_hf.py", "--load", str(ckpt), "--output", str(out))
    config = json.loads((out / "config.json").read_text())
    meta = config["elastic_moe"]
    assert meta["k_train"] == k_train
    assert meta["default_inference_k"] == default
    assert config["num_experts_per_tok"] == default
    assert meta["k_max"] == 3
