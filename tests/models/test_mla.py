"""Multi-latent attention and DeepSeek-style routing in the project's model section: what
validation refuses (each message names the key and the fix), and the router's inference k' checks
under group-limited routing. The numerics are tested against transformers in
tests/convert/test_deepseek_v3*.py."""

from __future__ import annotations

import pytest

from megatron_elastic.config import Config, ConfigError

MLA = dict(num_attention_heads=4, num_query_groups=4, multi_latent_attention=True, q_lora_rank=16,
           kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=8, qk_layernorm=True,
           num_moe_experts=16, moe_router_topk=4, moe_router_score_function="sigmoid")


def config(model=None, elastic=None):
    return Config.from_dict({"model": {**MLA, **(model or {})}, "elastic": elastic or {}}, source="t").validate()


@pytest.mark.parametrize("model, elastic, message", [
    (dict(num_query_groups=2), None, r"num_query_groups=2: multi-latent attention .* set model.num_query_groups=4"),
    (dict(kv_lora_rank=None), None, r"model.kv_lora_rank=None: multi-latent attention needs a positive int"),
    (dict(qk_pos_emb_head_dim=3), None, r"qk_pos_emb_head_dim=3 must be even"),
    (dict(q_lora_rank=0), None, r"q_lora_rank=0 must be a positive int, or null"),
    (dict(moe_router_score_function="softmax", moe_router_enable_expert_bias=True), None,
     r"moe_router_enable_expert_bias=true needs model.moe_router_score_function=sigmoid"),
    (dict(moe_router_num_groups=4), None, r"moe_router_num_groups and model.moe_router_group_topk go together"),
    (dict(rope_type="ntk"), None, r"model.rope_type='ntk' must be 'rope' or 'yarn'"),
    (dict(rope_type="yarn"), None, r"original_max_position_embeddings=None: YaRN needs the pretraining context"),
    (dict(rope_type="yarn", original_max_position_embeddings=8, rotary_scaling_factor=0.0), None,
     r"rotary_scaling_factor=0.0.*YaRN needs positive values"),
    (dict(multi_latent_attention=False, num_query_groups=2, rope_type="yarn", original_max_position_embeddings=8),
     None, r"rope_type=yarn is built by Megatron-core's multi-latent attention only"),
    (dict(moe_router_num_groups=3, moe_router_group_topk=2), None, r"divisible by model.moe_router_num_groups=3"),
    (dict(moe_router_num_groups=4, moe_router_group_topk=2), dict(schedule="layerwise", k_min=2, k_max=5),
     r"k values \[2, 3, 4, 5\] .* within one width, e.g. \[4, 5\]"),
    (dict(moe_router_num_groups=4, moe_router_group_topk=2), dict(eval_k=2), r"k values \[2, 4\]"),
    (dict(moe_router_num_groups=4, moe_router_group_topk=2, moe_router_topk=1), None, r"k values \[1\]"),
    (dict(moe_router_num_groups=4, moe_router_group_topk=1), dict(schedule="layerwise", k_min=4, k_max=5),
     r"k=5 exceeds the 4 experts of the model.moe_router_group_topk=1 groups"),
    (dict(moe_router_enable_expert_bias=True), dict(schedule="layerwise", k_min=2, k_max=4, pool_ratio=2.0),
     r"choose experts from the plain router scores"),
    (dict(moe_router_num_groups=4, moe_router_group_topk=2), dict(schedule="top_p", top_p=0.5, k_min=4, k_max=5),
     r"choose experts from the plain router scores"),
])
def test_refusals_name_the_key_and_the_fix(model, elastic, message):
    with pytest.raises(ConfigError, match=message):
        config(model, elastic)


def test_accepted_deepseek_style_configs():
    config(dict(moe_router_enable_expert_bias=True, moe_router_num_groups=4, moe_router_group_topk=2,
                moe_router_topk_scaling_factor=2.5), dict(schedule="layerwise", k_min=4, k_max=5, eval_k=5))
    config(dict(q_lora_rank=None, moe_router_enable_expert_bias=True), dict(schedule="batch", k_min=1, k_max=16))


def test_router_refuses_inference_k_outside_the_group_width(one_process_parallel):
    from megatron_elastic.device import seed_all
    from megatron_elastic.models.gpt import build_model
    from megatron_elastic.moe.router import elastic_routers

    cfg = config(dict(moe_router_enable_expert_bias=True, moe_router_num_groups=4, moe_router_group_topk=2,
                      vocab_size=64), dict(schedule="layerwise", k_min=4, k_max=5))
    seed_all(1)
    router = elastic_routers(build_model(cfg, 64))[0]
    router.set_inference(k=4)
    router.set_inference(k=5)
    with pytest.raises(ValueError, match=r"k'=3 with group-limited routing .* lie in \[4, 5\]"):
        router.set_inference(k=3)
    with pytest.raises(ValueError, match=r"k'=9 exceeds the experts of the 2 groups"):
        router.set_inference(k=9)
    with pytest.raises(ValueError, match="inference top-p chooses from the plain router scores"):
        router.set_inference(top_p=0.5)


def test_checkpoint_keys_are_the_transformer_engine_specs(one_process_parallel):
    """Megatron-core's TE spec fuses MLA's q/kv latent norms into linear_q_up_proj /
    linear_kv_up_proj (``layer_norm_weight``); the local spec saves its separate norms under those
    keys, so a checkpoint moves between CPU and GPU runs (and the DeepSeek export reads either)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from megatron_elastic.device import seed_all
    from megatron_elastic.models.gpt import build_model

    seed_all(1)
    model = build_model(config(dict(vocab_size=64)), 64)
    keys = {v.key for v in nested_values(model.sharded_state_dict()) if isinstance(v, ShardedTensor)}
    assert "decoder.layers.self_attention.linear_q_up_proj.layer_norm_weight" in keys
    assert "decoder.layers.self_attention.linear_kv_up_proj.layer_norm_weight" in keys
    assert not any("q_layernorm" in k or "kv_layernorm" in k for k in keys)


def test_yarn_fields_reach_megatrons_mla(one_process_parallel):
    """model.rope_type=yarn builds Megatron-core's YarnRotaryEmbedding with the recipe's fields and
    MLA's mscale_all_dim softmax factor; plain RoPE keeps 1/sqrt(d) (MLA's 40x default factor unused)."""
    import math

    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

    from megatron_elastic.device import seed_all
    from megatron_elastic.models.gpt import build_model

    seed_all(1)
    yarn = dict(rope_type="yarn", rotary_scaling_factor=40.0, original_max_position_embeddings=8, beta_fast=16.0,
                beta_slow=2.0, mscale=0.9, mscale_all_dim=0.7, vocab_size=64)
    attn = build_model(config(yarn), 64).decoder.layers[0].self_attention
    rope = attn.rotary_pos_emb
    assert isinstance(rope, YarnRotaryEmbedding)
    assert (rope.scaling_factor, rope.original_max_position_embeddings, rope.beta_fast, rope.beta_slow, rope.mscale,
            rope.mscale_all_dim) == (40.0, 8, 16.0, 2.0, 0.9, 0.7)
    d = 8 + 4
    assert math.isclose(attn.softmax_scale, (0.1 * 0.7 * math.log(40) + 1) ** 2 / math.sqrt(d))
    plain = build_model(config(dict(vocab_size=64)), 64).decoder.layers[0].self_attention
    assert not isinstance(plain.rotary_pos_emb, YarnRotaryEmbedding)
    assert math.isclose(plain.softmax_scale, 1 / math.sqrt(d))
