"""Architecture choice and refusals of the export (convert/hf_config.py)."""

from __future__ import annotations

import pytest


def test_export_architecture_choice_and_refusals():
    from megatron_elastic.config import Config
    from megatron_elastic.convert import ConversionError, UnknownArchitectureError
    from megatron_elastic.convert.hf_config import choose_architecture

    def cfg(**model):
        return Config.from_dict({"model": model}).validate()

    assert choose_architecture(cfg()) == "mixtral"
    assert choose_architecture(cfg(qk_layernorm=True)) == "qwen3_moe"
    assert choose_architecture(cfg(qk_layernorm=True, moe_router_pre_softmax=True)) == "qwen3_moe"
    with pytest.raises(UnknownArchitectureError, match="gpt2"):
        choose_architecture(cfg(), "gpt2")
    # Mixtral always renormalises: a pre-softmax router would silently change the model.
    with pytest.raises(ConversionError, match="renormalises"):
        choose_architecture(cfg(moe_router_pre_softmax=True))
    with pytest.raises(ConversionError, match="qwen3_moe"):
        choose_architecture(cfg(qk_layernorm=True), "mixtral")
    with pytest.raises(ConversionError, match="sigmoid"):
        choose_architecture(cfg(moe_router_score_function="sigmoid"))


def test_export_picks_the_architecture_of_each_feature_and_refuses_the_rest():
    """Auto choice: projection-wide QK-norm -> OLMoE, shared expert -> Qwen2-MoE, per-head QK-norm
    (dense layers or not) -> Qwen3-MoE; each feature an architecture lacks is named."""
    from megatron_elastic.config import Config
    from megatron_elastic.convert import ConversionError
    from megatron_elastic.convert.hf_config import choose_architecture

    def cfg(**model):
        return Config.from_dict({"model": {"num_layers": 2, **model}}).validate()

    shared = dict(moe_shared_expert_intermediate_size=16, moe_shared_expert_gate=True)
    dense = dict(moe_layer_freq=[1, 0], ffn_hidden_size=32)
    assert choose_architecture(cfg(qk_layernorm=True, qk_norm_scope="projection")) == "olmoe"
    assert choose_architecture(cfg(add_qkv_bias=True, **shared, **dense)) == "qwen2_moe"
    assert choose_architecture(cfg(qk_layernorm=True, **dense)) == "qwen3_moe"
    cases = [
        (cfg(**dense), None, r"dense layers: MixtralForCausalLM makes every layer MoE \(qwen2_moe and qwen3_moe"),
        (cfg(**shared), "mixtral", "moe_shared_expert_intermediate_size=16: MixtralForCausalLM has no shared"),
        (cfg(qk_layernorm=True, **shared), "qwen3_moe", "Qwen3MoeForCausalLM has no shared expert"),
        (cfg(add_qkv_bias=True), None, "add_qkv_bias=true: MixtralForCausalLM has no q/k/v biases"),
        (cfg(moe_shared_expert_intermediate_size=16), None, "always scales its shared expert by a sigmoid gate"),
        (cfg(), "qwen2_moe", "Qwen2-MoE always has a gated shared expert"),
        (cfg(qk_layernorm=True, qk_norm_scope="projection"), "qwen3_moe", "export it as olmoe"),
        (cfg(qk_layernorm=True), "olmoe", "applies per projection: export it as qwen3_moe"),
        (cfg(qk_layernorm=True, qk_norm_scope="projection", **dense), None, "OlmoeForCausalLM makes every layer MoE"),
        (cfg(qk_layernorm=True, qk_norm_scope="projection", kv_channels=8, hidden_size=64),
         None, "OLMoE's head dim is always hidden_size / num_attention_heads = 16"),
    ]
    for config, requested, match in cases:
        with pytest.raises(ConversionError, match=match):
            choose_architecture(config, requested)
