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
        (["parallel.pipeline_model_parallel_size=4"],
         "model.num_layers=2 is not divisible by pipeline stages = 4"),
        (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"],
         "not divisible by pipeline stages x virtual stages = 2 x 2"),
        (["parallel.virtual_pipeline_model_parallel_size=2"],
         "needs parallel.pipeline_model_parallel_size > 1"),
        (["parallel.pipeline_model_parallel_size=2", "model.untie_embeddings_and_output_weights=false"],
         "tied embeddings) is not supported with parallel.pipeline_model_parallel_size > 1"),
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


def test_pipeline_micro_batch_checks():
    """1F1B needs at least one micro-batch per stage; the interleaved schedule whole groups of
    pipeline-size micro-batches (Megatron-core raises otherwise, mid-step)."""
    cfg = load_config(SMOKE, ["model.num_layers=4", "parallel.pipeline_model_parallel_size=4",
                              "train.global_batch_size=16", "train.micro_batch_size=8"])
    with pytest.raises(ConfigError, match="2 micro-batches per iteration .* fewer than "
                                          "parallel.pipeline_model_parallel_size=4"):
        cfg.validate_world(4)
    cfg = load_config(SMOKE, ["model.num_layers=4", "parallel.pipeline_model_parallel_size=2",
                              "parallel.virtual_pipeline_model_parallel_size=2",
                              "train.global_batch_size=24", "train.micro_batch_size=8"])
    with pytest.raises(ConfigError, match="3 micro-batches per iteration is not a multiple of"):
        cfg.validate_world(2)
    assert load_config(SMOKE, ["model.num_layers=4", "parallel.pipeline_model_parallel_size=2",
                               "parallel.virtual_pipeline_model_parallel_size=2",
                               "train.global_batch_size=32", "train.micro_batch_size=8"]).validate_world(2) == 1


def test_unknown_key_in_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_layer: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key in section 'model' 'model.num_layer'; did you mean 'model.num_layers'"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/recipe.yaml")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lr=0"], "train.lr=0.0 must be > 0"),
        (["train.lr=-1e-3"], "train.lr=-0.001 must be > 0"),
        (["train.min_lr=1e-2", "train.lr=1e-3"], "train.min_lr=0.01 must lie in [0, train.lr=0.001]: lower train.min_lr"),
        (["train.min_lr=-1"], "train.min_lr=-1.0 must lie in [0, train.lr="),
        (["train.lr_warmup_iters=400", "train.train_iters=300"],
         "train.lr_warmup_iters=400 exceeds train.train_iters=300: the learning rate would never reach "
         "train.lr; set train.lr_warmup_iters <= 300"),
        (["train.lr_warmup_iters=400", "train.lr_decay_iters=300"], "exceeds train.lr_decay_iters=300"),
        (["train.lr_warmup_iters=-1"], "train.lr_warmup_iters=-1 must be >= 0"),
        (["model.hidden_dropout=1.0"], "model.hidden_dropout=1.0 must lie in [0, 1)"),
        (["model.attention_dropout=-0.1"], "model.attention_dropout=-0.1 must lie in [0, 1)"),
        (["train.weight_decay=-0.1"], "train.weight_decay=-0.1 must be >= 0"),
        (["train.clip_grad=-1"], "train.clip_grad=-1.0 must be >= 0 (0 = no clipping)"),
        (["train.adam_beta1=1.0"], "train.adam_beta1=1.0 must lie in [0, 1)"),
        (["train.adam_beta2=-0.5"], "train.adam_beta2=-0.5 must lie in [0, 1)"),
        (["train.adam_eps=0"], "train.adam_eps=0.0 must be > 0"),
        (["train.eval_iters=-1"], "train.eval_iters=-1 must be >= 0"),
        (["train.max_consecutive_skips=-2"], "train.max_consecutive_skips=-2 must be >= 0"),
        (["model.init_method_std=0"], "model.init_method_std=0.0 must be > 0"),
        (["model.vocab_size=1001", "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
         "model.vocab_size=1001 is not divisible by parallel.tensor_model_parallel_size=2"),
        (["parallel.distributed_timeout_minutes=0"], "parallel.distributed_timeout_minutes=0.0 must be > 0"),
        (["model.moe_router_load_balancing_type=balanced"], "moe_router_load_balancing_type='balanced' is not one of"),
        (["model.moe_pad_expert_input_to_capacity=true"],
         "moe_pad_expert_input_to_capacity=true needs model.moe_expert_capacity_factor"),
        (["model.moe_expert_capacity_factor=1.0", "model.moe_router_load_balancing_type=sinkhorn"],
         "does not work with model.moe_router_load_balancing_type=sinkhorn"),
        (["model.moe_expert_capacity_factor=0"], "moe_expert_capacity_factor=0.0 must be > 0"),
        (["model.moe_expert_capacity_factor=1.0", "model.moe_pad_expert_input_to_capacity=true",
          "elastic.schedule=layerwise", "elastic.k_min=1", "elastic.k_max=3",
          "parallel.expert_model_parallel_size=2"],
         "expert-parallel ranks hold different micro-batches, which draw different k"),
        (["model.moe_aux_loss_coeff=-1"], "model.moe_aux_loss_coeff=-1.0 must be >= 0"),
        # Megatron's TransformerConfig: "Please use --moe-router-pre-softmax when topk is 1".
        (["model.moe_router_topk=1", "elastic.k_min=1", "elastic.k_max=1", "elastic.pool_ratio=null"],
         "model.moe_router_topk=1 (elastic k range [1, 1]) with renormalised softmax gates "
         "(model.moe_router_pre_softmax=false)"),
    ],
)
def test_numeric_ranges_and_moe_settings_are_rejected(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_what_megatron_accepts_is_not_rejected():
    """Only what would crash is refused: top-1 with pre-softmax gates, elastic schedules that
    draw k = 1 for some layers (they route through ElasticRouter, Megatron sees k_max), a
    warmup longer than a run that stops early within a longer schedule (launchers/smoke.sh),
    and a fractional collective timeout."""
    load_config(SMOKE, ["model.moe_router_topk=1", "elastic.k_min=1", "elastic.k_max=1",
                        "elastic.pool_ratio=null", "model.moe_router_pre_softmax=true"])
    cfg = load_config(SMOKE, ["model.moe_router_topk=2", "elastic.schedule=layerwise", "elastic.k_min=1",
                              "elastic.k_max=2", "elastic.pool_ratio=null"])
    assert cfg.buffer_k == 2
    load_config(SMOKE, ["train.train_iters=10", "train.lr_warmup_iters=20", "train.lr_decay_iters=300"])
    cfg = load_config(SMOKE, ["parallel.distributed_timeout_minutes=0.25", "train.clip_grad=0",
                              "train.weight_decay=0", "train.eval_iters=0", "train.max_consecutive_skips=0"])
    assert cfg.parallel.distributed_timeout_minutes == 0.25


def test_collective_timeout(monkeypatch):
    from datetime import timedelta

    from megatron_elastic.parallel import collective_timeout

    cfg = load_config(SMOKE, ["parallel.distributed_timeout_minutes=0.5"])
    monkeypatch.delenv("MEGATRON_ELASTIC_TIMEOUT_S", raising=False)
    assert collective_timeout(cfg) == timedelta(seconds=30)
    monkeypatch.setenv("MEGATRON_ELASTIC_TIMEOUT_S", "7.5")
    assert collective_timeout(cfg) == timedelta(seconds=7.5)
    monkeypatch.setenv("MEGATRON_ELASTIC_TIMEOUT_S", "soon")
    with pytest.raises(ConfigError, match=r"MEGATRON_ELASTIC_TIMEOUT_S='soon' must be a positive number of seconds"):
        collective_timeout(cfg)
