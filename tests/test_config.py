"""Config loading, overrides and every validation error the backbone issue lists."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_elastic.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


def test_recipes_load_and_validate():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.model.num_moe_experts >= cfg.elastic_k_max


def test_dotted_overrides_are_typed():
    cfg = load_config(SMOKE, ["model.num_layers=4", "train.lr=3e-4", "data.data_path=[a,b]",
                              "checkpoint.load=null", "model.qk_layernorm=true"])
    assert cfg.model.num_layers == 4
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.data_path == ["a", "b"]
    assert cfg.checkpoint.load is None
    assert cfg.model.qk_layernorm is True


def test_yaml_float_written_without_dot_is_accepted():
    # PyYAML reads "3e-4" as a string (YAML 1.1); a config value must still be a float.
    cfg = Config.from_dict({"train": {"lr": "3e-4"}}).validate()
    assert cfg.train.lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.hidden_sise=64"], "did you mean 'model.hidden_size'"),
        (["modle.num_layers=2"], "unknown section 'modle'"),
        (["train.lr"], "section.key=value"),
        (["model.num_layers=two"], "model.num_layers must be an integer"),
        (["model.num_moe_experts=6", "parallel.expert_model_parallel_size=4"],
         "num_moe_experts=6 is not divisible by parallel.expert_model_parallel_size=4"),
        (["model.num_attention_heads=4", "model.num_query_groups=3"],
         "num_attention_heads=4 is not divisible by model.num_query_groups=3"),
        (["train.global_batch_size=10", "train.micro_batch_size=4"],
         "global_batch_size=10 is not divisible by train.micro_batch_size=4"),
        (["model.moe_router_topk=9"], "moe_router_topk=9 exceeds model.num_moe_experts=8"),
        (["elastic.k_max=9"], "must lie within [1, model.num_moe_experts=8]"),
        (["elastic.k_min=3", "elastic.k_max=2", "elastic.pool_ratio=null"], "k_min=3 is larger than elastic.k_max=2"),
        (["elastic.pool_ratio=3"], "exceeds model.num_moe_experts=8"),
        (["elastic.schedule=sometimes"], "elastic.schedule='sometimes' is not one of"),
        (["elastic.schedule=top_p", "elastic.top_p=null"], "needs elastic.top_p"),
        (["elastic.tau=0"], "elastic.tau=0.0 must be positive"),
        (["parallel.tensor_model_parallel_size=2"], "requires parallel.sequence_parallel=true"),
        (["parallel.pipeline_model_parallel_size=2"], "pipeline_model_parallel_size must be 1"),
    ],
)
def test_impossible_settings_are_rejected(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, overrides)
    assert message in str(err.value)


def test_world_size_checks():
    cfg = load_config(SMOKE, ["parallel.expert_model_parallel_size=2", "train.global_batch_size=16",
                              "train.micro_batch_size=8"])
    assert cfg.validate_world(2) == 2
    with pytest.raises(ConfigError, match="not divisible by expert x expert-tensor x pipeline"):
        cfg.validate_world(3)
    with pytest.raises(ConfigError, match=r"global_batch_size=16 is not divisible by train.micro_batch_size=8 x data parallel size=4"):
        cfg.validate_world(4)


def test_unknown_key_in_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_layer: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key in section 'model' 'model.num_layer'; did you mean 'model.num_layers'"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/recipe.yaml")
