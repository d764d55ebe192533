"""Model options beyond every-layer-MoE (models/gpt.py, models/norm.py, config validation): mixed
dense/MoE layers (model.moe_layer_freq), the always-on shared expert with its sigmoid gate, q/k/v
biases and QK-norm over the whole q / k projection (OLMoE), with elastic k on what remains MoE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_elastic.config import Config, ConfigError
from megatron_elastic.moe.control import inference_k, set_inference_k
from megatron_elastic.moe.router import elastic_routers

from moe_builders import (  # noqa: F401 (fixtures)
    DEVICE,
    build_small_model,
    fresh_moe_globals,
    make_input,
    model_forward,
    single_process,
)

MIXED = {"model.num_layers": 3, "model.moe_layer_freq": "[1,0,1]", "model.ffn_hidden_size": 24,
         "model.moe_shared_expert_intermediate_size": 12, "model.moe_shared_expert_gate": "true",
         "model.add_qkv_bias": "true", "model.init_method_std": 0.3}


def _cfg(**model):
    base = {"num_layers": 4, "hidden_size": 16, "num_attention_heads": 2, "num_query_groups": 1,
            "num_moe_experts": 4, "moe_ffn_hidden_size": 8}
    base.update(model)
    return Config.from_dict({"model": base})


# ------------------------------------------------------------------------------ configuration
def test_moe_layer_pattern_follows_megatron():
    assert _cfg(moe_layer_freq=2, ffn_hidden_size=32).validate().model.moe_layer_pattern == [1, 0, 1, 0]
    cfg = _cfg(moe_layer_freq=[0, 1, 1, 0], ffn_hidden_size=32).validate()
    assert cfg.model.moe_layers == [1, 2]
    assert _cfg().validate().model.moe_layers == [0, 1, 2, 3]


@pytest.mark.parametrize("model, match", [
    ({"moe_layer_freq": [1, 0]}, r"moe_layer_freq lists 2 entries for model.num_layers=4"),
    ({"moe_layer_freq": [1, 2, 1, 1]}, r"moe_layer_freq=\[1, 2, 1, 1\] must be an int >= 1 or a list of 0/1"),
    ({"moe_layer_freq": 0}, r"moe_layer_freq=0 must be >= 1"),
    ({"moe_layer_freq": [0, 0, 0, 0], "ffn_hidden_size": 8}, "makes no layer MoE"),
    ({"moe_layer_freq": 2}, r"has dense layers but model.ffn_hidden_size is None"),
    ({"moe_shared_expert_gate": True}, "moe_shared_expert_gate=true needs a shared expert"),
    ({"moe_shared_expert_intermediate_size": 0}, "moe_shared_expert_intermediate_size=0 must be a positive"),
    ({"qk_norm_scope": "group"}, "qk_norm_scope='group' must be 'head' or 'projection'"),
    ({"qk_norm_scope": "projection"}, "qk_norm_scope=projection needs model.qk_layernorm=true"),
])
def test_layer_options_refused_with_the_fix(model, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**model).validate()


def test_projection_qk_norm_refuses_tensor_parallelism():
    raw = {"model": {"qk_layernorm": True, "qk_norm_scope": "projection", "num_attention_heads": 4},
           "parallel": {"tensor_model_parallel_size": 2, "sequence_parallel": True}}
    with pytest.raises(ConfigError, match="tensor_model_parallel_size=1"):
        Config.from_dict(raw).validate()


def test_eval_k_lists_one_k_per_moe_layer():
    raw = {"model": {"num_layers": 4, "moe_layer_freq": 2, "ffn_hidden_size": 32}, "elastic": {"eval_k": [2, 1]}}
    assert Config.from_dict(raw).validate().elastic.eval_k == [2, 1]
    raw["elastic"]["eval_k"] = [2, 1, 2, 1]
    with pytest.raises(ConfigError, match=r"4 values but the model has 2 MoE layers.*MoE layers are \[0, 2\]"):
        Config.from_dict(raw).validate()


# ------------------------------------------------------------------------------ the built model
def test_mixed_layers_shared_expert_and_biases_build_as_specified():
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

    from megatron_elastic.models.gpt import layer_specs
    from megatron_elastic.moe.layer import ElasticMoELayer

    cfg, model = build_small_model(MIXED)
    assert [spec.submodules.mlp.module for spec in layer_specs(cfg, use_te=False)] == [ElasticMoELayer, MLP,
                                                                                        ElasticMoELayer]
    layers = model.decoder.layers
    assert type(layers[1].mlp) is MLP and not hasattr(layers[1].mlp, "router")
    assert tuple(layers[1].mlp.linear_fc1.weight.shape) == (48, 16)  # [gate; up] of ffn_hidden_size 24
    for i in (0, 2):
        assert isinstance(layers[i].mlp.shared_experts, SharedExpertMLP)
        assert tuple(layers[i].mlp.shared_experts.gate_weight.shape) == (1, 16)
        assert layers[i].self_attention.linear_qkv.bias is not None
    assert [r.layer_number for r in elastic_routers(model)] == [1, 3]
    assert inference_k(model) == [2, 2]  # one k per MoE layer: the dense layer has none
    set_inference_k(model, [1, 3])
    assert inference_k(model) == [1, 3]
    with pytest.raises(ValueError, match="3 values but the model has 2 MoE layers"):
        set_inference_k(model, [1, 2, 3])


def test_shared_expert_is_always_on_and_k_counts_routed_experts_only():
    """MoE output at any k' = routed experts at k' + sigmoid(x g) * SwiGLU_shared(x), the shared
    part written out by hand; the router reports k' (the shared expert is not one of the k)."""
    _, model = build_small_model(MIXED)
    model.eval()
    layer = model.decoder.layers[0].mlp
    shared = layer.shared_experts
    x = make_input(3)
    w1, w2 = shared.linear_fc1.weight.detach(), shared.linear_fc2.weight.detach()
    gate, up = (x @ w1.t()).chunk(2, dim=-1)
    by_hand = (F.silu(gate) * up) @ w2.t() * torch.sigmoid(x @ shared.gate_weight.detach().t())
    for k in (1, 3):
        set_inference_k(model, k)
        with torch.no_grad():
            full, _ = layer(x)
            assert layer.router.last_k == k
            layer.shared_experts, layer.use_shared_expert = None, False
            try:
                routed, _ = layer(x)
            finally:
                layer.shared_experts, layer.use_shared_expert = shared, True
        torch.testing.assert_close(full, routed + by_hand, atol=1e-6, rtol=1e-5)
        assert float(by_hand.abs().max()) > 1e-2  # the shared part is not negligible


def test_layerwise_training_step_reaches_shared_experts_and_dense_layers():
    """A training forward under a layer-wise schedule draws k only for MoE layers; the backward
    reaches the shared expert (and its gate) and the dense layer's MLP."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    _, model = build_small_model({**MIXED, "elastic.schedule": "layerwise", "elastic.k_min": 1,
                                  "elastic.k_max": 3, "elastic.pool_ratio": 1.5})
    model.train()
    logits = model_forward(model, it=2)
    logits.float().square().mean().backward()
    routers = elastic_routers(model)
    assert [r.last_k for r in routers] == [routers[0].sampler.k_for(2, 0, i) for i in (0, 2)]
    layers = model.decoder.layers
    for p in (layers[0].mlp.shared_experts.gate_weight, layers[2].mlp.shared_experts.linear_fc1.weight,
              layers[1].mlp.linear_fc1.weight, layers[1].self_attention.linear_qkv.bias):
        assert p.grad is not None and float(p.grad.abs().max()) > 0
    k_logged = get_moe_layer_wise_logging_tracker()["k"]["values"].tolist()
    assert k_logged[1] == 0 and k_logged[0] == routers[0].last_k and k_logged[2] == routers[1].last_k


# ------------------------------------------------------------------------------ projection QK-norm
def test_projection_qk_norm_matches_olmoe_norm():
    """``ProjectionRMSNorm`` on Megatron's [s, b, heads, head_dim] = OLMoE's RMSNorm of the
    flattened q (or k) projection, with weights spanning every head."""
    from megatron.core.transformer.transformer_config import TransformerConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm

    from megatron_elastic.models.norm import ProjectionRMSNorm

    config = TransformerConfig(num_layers=1, hidden_size=24, num_attention_heads=4, num_query_groups=2,
                               kv_channels=6, normalization="RMSNorm")
    g = torch.Generator().manual_seed(0)
    for heads, count in (("query", 4), ("key", 2)):
        norm = ProjectionRMSNorm(config, hidden_size=6, eps=1e-5, heads=heads)
        reference = OlmoeRMSNorm(count * 6, eps=1e-5)
        weight = 1 + 0.3 * torch.randn(count * 6, generator=g)
        with torch.no_grad():
            norm.weight.copy_(weight)
            reference.weight.copy_(weight)
        x = 3 * torch.randn(5, 2, count, 6, generator=g)
        torch.testing.assert_close(norm(x), reference(x.reshape(5, 2, count * 6)).reshape(x.shape),
                                   atol=1e-6, rtol=1e-6)
        # Not the per-head norm: each head's scale depends on the other heads.
        per_head = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5) * weight.reshape(count, 6)
        assert float((norm(x) - per_head).detach().abs().max()) > 1e-2


def test_projection_qk_norm_model_builds_with_full_width_weights():
    _, model = build_small_model({"model.qk_layernorm": "true", "model.qk_norm_scope": "projection",
                                  "model.num_attention_heads": 4, "model.num_query_groups": 2})
    attn = model.decoder.layers[0].self_attention
    assert tuple(attn.q_layernorm.weight.shape) == (16,) and tuple(attn.k_layernorm.weight.shape) == (8,)
    model.eval()
    assert torch.isfinite(model_forward(model, 0)).all()
