"""DeepSeek-V3 family mapping (convert/deepseek_v3.py) against the real classes on both sides.

Tiny random transformers ``DeepseekV3ForCausalLM`` models in three shapes (DeepSeek-V3-like: q
LoRA, active group-limited routing, a shared expert, a dense first layer; V2-Lite-like: no q LoRA,
one group; Moonlight-like: two shared experts, no group limit, tied embeddings, rope_interleave
off) are mapped to Megatron-core names and loaded, strictly, into a Megatron-core MLA GPT built on
CPU from the mapped fields with Megatron's own block spec (local layers, MoELayer + TopKRouter,
SharedExpertMLP, dense MLP layers) and the project's SDPA core attention. Checked: names and shapes
equal what Megatron-core builds, HF -> Megatron -> HF is bit-identical, logits equal HF's (1e-4,
fp32) at k_train and at elastic k' set on both sides, a backward pass runs, and the refusals.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conversion_helpers import record_diff
from megatron_elastic.convert import ConversionError, MissingTensorError, ShapeMismatchError
from megatron_elastic.convert import deepseek_v3 as ds

TOL = 1e-4
VOCAB, SEQ = 96, 16

BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
            kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=8,
            max_position_embeddings=64, routed_scaling_factor=2.5, rms_norm_eps=1e-6)
VARIANTS = {
    # k_train 4 with topk_group 2: group score width 4 // 2 = 2 = transformers' top-2.
    "v3": dict(q_lora_rank=24, n_shared_experts=1, n_routed_experts=16, n_group=4, topk_group=2,
               num_experts_per_tok=4, first_k_dense_replace=1),
    "v2_lite": dict(q_lora_rank=None, n_shared_experts=1, n_group=1, topk_group=1, num_experts_per_tok=3,
                    first_k_dense_replace=1, routed_scaling_factor=1.0),
    "moonlight": dict(q_lora_rank=None, n_shared_experts=2, n_group=1, topk_group=1, num_experts_per_tok=2,
                      first_k_dense_replace=0, tie_word_embeddings=True, rope_interleave=False,
                      routed_scaling_factor=2.446),
}
# Elastic k' checked on both sides per variant (all within supported_inference_k).
ELASTIC_K = {"v3": [5], "v2_lite": [2, 5, 8], "moonlight": [3, 8]}


def hf_model(name: str, variants: dict = VARIANTS):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(**{**BASE, **variants[name]})
    model = DeepseekV3ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * noise if "norm" in pname else 0.15 * noise)
        for layer in model.model.layers:  # a nonzero selection bias, so its mapping matters
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                gate.e_score_correction_bias.copy_(0.05 * torch.randn(gate.e_score_correction_bias.shape, generator=g))
    return model


def hf_state(model) -> dict:
    """What save_pretrained writes (hub format: per-expert tensors), from the live model."""
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return load_file(str(Path(tmp) / "model.safetensors"))


def megatron_model(fields: dict):
    """A Megatron-core MLA GPT from ``megatron_fields`` with Megatron's own block spec (local
    layers) and the project's SDPA core attention (Megatron's local DotProductAttention does not
    take MLA's k/v channels)."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from megatron_elastic.models.attention import SDPAttention

    f = dict(fields)
    vocab, max_pos = f.pop("vocab_size"), f.pop("max_position_embeddings")
    untie = f.pop("untie_embeddings_and_output_weights")
    config = MLATransformerConfig(
        **f, add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, attention_dropout=0.0, hidden_dropout=0.0,
        moe_token_dispatcher_type="alltoall", moe_aux_loss_coeff=0.0, use_cpu_initialization=False,
        gradient_accumulation_fusion=False)
    spec = copy.deepcopy(get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm"))
    for layer in spec.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = SDPAttention
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab, max_sequence_length=max_pos,
                    position_embedding_type="rope", share_embeddings_and_output_weights=not untie).eval()


def set_k(hf, meg, k: int) -> None:
    from megatron.core.transformer.moe.router import TopKRouter

    for module in meg.modules():
        if isinstance(module, TopKRouter):
            module.topk = k
    for layer in hf.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.top_k = k


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))


def logits_pair(hf, meg):
    ids = tokens()
    with torch.no_grad():
        a = hf(input_ids=ids).logits.float()
        b = meg(ids, torch.arange(SEQ).expand(2, -1), None).float()
    return a, b


# ------------------------------------------------------------------------------ pure tensors
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_hf_to_megatron_to_hf_is_bit_identical_on_tensors(name):
    model = hf_model(name)
    state = hf_state(model)
    shape = ds.shape_from_hf(model.config)
    assert {k: tuple(v.shape) for k, v in state.items()} == ds.hf_param_shapes(shape)
    meg = ds.hf_to_megatron(state, shape)
    assert {k: tuple(v.shape) for k, v in meg.items()} == ds.megatron_param_shapes(shape)
    back = ds.megatron_to_hf(meg, shape)
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_rope_rows_follow_megatrons_interleaved_reading():
    """Megatron's MLA reads the rope dims as interleaved pairs, like rope_interleave=true: rows
    map as they are; with rope_interleave=false HF's two halves become Megatron's evens and odds."""
    model = hf_model("v3")
    shape = ds.shape_from_hf(model.config)
    q = model.model.layers[0].self_attn.q_b_proj.weight.detach()
    assert shape.rope_interleave and torch.equal(ds.megatron_rope_rows(q, shape, "q"), q)
    import dataclasses

    plain = dataclasses.replace(shape, rope_interleave=False)
    mq = ds.megatron_rope_rows(q, plain, "q")
    per_head, nope, rope = shape.q_head_dim, shape.qk_nope_head_dim, shape.qk_rope_head_dim
    for h in range(shape.num_heads):
        src, dst = q[h * per_head:(h + 1) * per_head], mq[h * per_head:(h + 1) * per_head]
        assert torch.equal(dst[:nope], src[:nope])  # the no-position part is untouched
        assert torch.equal(dst[nope::2], src[nope:nope + rope // 2])  # first half -> evens
        assert torch.equal(dst[nope + 1::2], src[nope + rope // 2:])  # second half -> odds
    assert torch.equal(ds.megatron_rope_rows(mq, plain, "q", to_hf=True), q)
    kv = model.model.layers[0].self_attn.kv_a_proj_with_mqa.weight.detach()
    mkv = ds.megatron_rope_rows(kv, plain, "kv_a")
    r = shape.kv_lora_rank
    assert torch.equal(mkv[:r], kv[:r]) and torch.equal(mkv[r::2], kv[r:r + rope // 2])
    assert torch.equal(ds.megatron_rope_rows(mkv, plain, "kv_a", to_hf=True), kv)


def test_config_fields_round_trip():
    from transformers import DeepseekV3Config

    for name in VARIANTS:
        config = DeepseekV3Config(**{**BASE, **VARIANTS[name]})
        fields = ds.megatron_fields(config)
        back = DeepseekV3Config(**ds.hf_config_kwargs(fields, rope_interleave=config.rope_interleave))
        for key in ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
                    "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim",
                    "num_experts_per_tok", "first_k_dense_replace", "rms_norm_eps", "tie_word_embeddings",
                    "rope_parameters", "rope_interleave", "vocab_size"):
            assert getattr(back, key) == getattr(config, key), (name, key)
        if ds.group_limit_is_active(config):
            assert (back.n_group, back.topk_group) == (config.n_group, config.topk_group)
    v3 = ds.megatron_fields(DeepseekV3Config(**{**BASE, **VARIANTS["v3"]}))
    assert v3["moe_layer_freq"] == [0, 1, 1] and v3["moe_shared_expert_intermediate_size"] == 16
    assert v3["num_moe_experts"] == 16
    assert (v3["moe_router_num_groups"], v3["moe_router_group_topk"]) == (4, 2)
    moon = ds.megatron_fields(DeepseekV3Config(**{**BASE, **VARIANTS["moonlight"]}))
    assert moon["moe_router_num_groups"] is None and moon["moe_shared_expert_intermediate_size"] == 32


# ------------------------------------------------------------------------------ against Megatron-core
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_megatron_mla_model_matches_hf_logits(one_process_parallel, name):
    from megatron_elastic.device import seed_all

    seed_all(5)
    hf = hf_model(name)
    shape = ds.shape_from_hf(hf.config)
    meg = megatron_model(ds.megatron_fields(hf.config))
    built = {k: tuple(v.shape) for k, v in meg.state_dict().items() if not k.endswith("_extra_state")}
    assert built == ds.megatron_param_shapes(shape)  # the mapping's names are Megatron-core's own
    meg.load_state_dict(ds.hf_to_megatron(hf_state(hf), shape), strict=True)

    k_train = hf.config.num_experts_per_tok
    diffs = {}
    for k in [k_train] + ELASTIC_K[name]:
        ds.check_inference_k(hf.config, k)
        set_k(hf, meg, k)
        a, b = logits_pair(hf, meg)
        diffs[k] = record_diff(f"deepseek {name} k={k}", a, b)
        assert diffs[k] < TOL, (k, diffs[k])
    # The k actually changes the outputs (so the comparisons above are not vacuous).
    set_k(hf, meg, k_train)
    base, _ = logits_pair(hf, meg)
    set_k(hf, meg, ELASTIC_K[name][-1])
    other, _ = logits_pair(hf, meg)
    assert float((base - other).abs().max()) > 100 * TOL

    # Training runs through MLA, the sigmoid router with its bias, shared experts and dense layers.
    meg.train()
    ids = tokens()
    labels = torch.roll(ids, -1, dims=1)
    loss = meg(ids, torch.arange(SEQ).expand(2, -1), None, labels=labels).float().mean()
    loss.backward()
    grads = {n: p.grad for n, p in meg.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert float(grads["decoder.layers.0.self_attention.linear_kv_down_proj.weight"].abs().sum()) > 0


# ------------------------------------------------------------------------------ refusals
def test_inference_k_the_routers_disagree_on_is_refused():
    from transformers import DeepseekV3Config

    v3 = DeepseekV3Config(**{**BASE, **VARIANTS["v3"]})
    # The group width k // 2 must be 2 (k in 4-5) and k must fit in 2 of the 4 groups of 4.
    assert ds.supported_inference_k(v3) == [4, 5]
    with pytest.raises(ConversionError, match=r"group-limited routing .* k // topk_group == 2.*Supported k: 4-5"):
        ds.check_inference_k(v3, 2)
    with pytest.raises(ConversionError, match="at k=1 .* renormalises it to 1"):
        ds.check_inference_k(DeepseekV3Config(**{**BASE, **VARIANTS["moonlight"]}), 1)
    narrow = DeepseekV3Config(**{**BASE, **VARIANTS["v3"], "n_routed_experts": 8})  # 4 groups of 2
    assert ds.supported_inference_k(narrow) == [4]
    # DeepSeek-V3's own routing (256 experts, 8 groups, 4 chosen, k = 8): k' in 8-11 only.
    real = DeepseekV3Config(**{**BASE, "n_routed_experts": 256, "n_group": 8, "topk_group": 4,
                               "num_experts_per_tok": 8})
    assert ds.supported_inference_k(real) == [8, 9, 10, 11]


def test_unsupported_configs_are_refused_with_the_reason():
    from transformers import DeepseekV3Config

    base = {**BASE, **VARIANTS["v3"]}
    cases = [
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                               "original_max_position_embeddings": 16}), "RoPE scaling 'yarn'"),
        (dict(rms_norm_eps=1e-5), "latent norms always use 1e-06"),
        (dict(norm_topk_prob=False), "norm_topk_prob=false"),
        (dict(attention_bias=True), "attention_bias=true"),
        (dict(num_experts_per_tok=2), "k=2 cannot be reproduced"),
    ]
    for extra, message in cases:
        with pytest.raises(ConversionError, match=message):
            ds.check_supported(DeepseekV3Config(**{**base, **extra}), "cfg.json")
    ds.check_supported(DeepseekV3Config(**base))


def test_bad_tensors_are_named():
    model = hf_model("v2_lite")
    shape = ds.shape_from_hf(model.config)
    state = hf_state(model)
    missing = dict(state)
    del missing["model.layers.1.mlp.gate.e_score_correction_bias"]
    with pytest.raises(MissingTensorError, match="e_score_correction_bias"):
        ds.hf_to_megatron(missing, shape)
    wrong = dict(state)
    wrong["model.layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ShapeMismatchError, match=r"kv_b_proj.weight: got \(3, 3\)"):
        ds.hf_to_megatron(wrong, shape)
    extra = dict(state)
    extra["model.layers.3.eh_proj.weight"] = torch.zeros(2, 2)  # a multi-token-prediction layer
    with pytest.raises(ConversionError, match="does not use.*eh_proj"):
        ds.hf_to_megatron(extra, shape)
