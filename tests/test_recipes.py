"""Recipes name a base recipe and hold only what differs; the shipped recipes resolve as before."""

from __future__ import annotations

import pytest

from helpers import REPO

from megatron_elastic.config import ConfigError, load_config


def test_shipped_recipes_share_one_base():
    smoke = load_config(REPO / "configs" / "smoke.yaml")
    for name, schedule, pool in (("topk", "fixed", None), ("emoe", "fixed", 2.0),
                                 ("mmoe_layerwise", "layerwise", None),
                                 ("elastic_combined", "layerwise", 2.0)):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.model == smoke.model and cfg.train == smoke.train and cfg.data == smoke.data
        assert cfg.checkpoint.save == f"runs/{name}/checkpoints"
        assert cfg.logging.tensorboard_dir == f"runs/{name}/tensorboard"
        assert (cfg.elastic.schedule, cfg.elastic.pool_ratio) == (schedule, pool)
        assert "base:" in (REPO / "configs" / f"{name}.yaml").read_text()
    topk = load_config(REPO / "configs" / "topk.yaml")
    assert topk.k_train == 2 and topk.elastic.router_loss_coeff == 0.0  # smoke's pool/loss reset


def test_base_chain_overrides_key_by_key(tmp_path):
    (tmp_path / "a.yaml").write_text("model: {num_layers: 3, hidden_size: 32}\ntrain: {lr: 0.1}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nmodel: {num_layers: 5}\n")
    (tmp_path / "c.yaml").write_text("base: sub/b.yaml\ntrain: {lr: 0.2}\n")
    cfg = load_config(tmp_path / "c.yaml", ["model.hidden_size=64"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.train.lr) == (5, 64, 0.2)


@pytest.mark.parametrize("files, message", [
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "base recipes form a cycle: a.yaml -> b.yaml -> a.yaml"),
    ({"a.yaml": "base: missing.yaml\n"}, "base recipe missing.yaml not found"),
    ({"a.yaml": "base: [x]\n"}, "base must be a recipe file name"),
])
def test_bad_bases_are_named(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(tmp_path / "a.yaml")
