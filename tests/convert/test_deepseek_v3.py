"""DeepSeek-V2/V3 family mapping (convert/deepseek_v3.py) against the real classes on both sides.

Tiny random transformers ``DeepseekV3ForCausalLM`` models in four shapes (DeepSeek-V3-like: q
LoRA, active group-limited routing, a shared expert, a dense first layer; V2-Lite-like: no q LoRA,
one group; Moonlight-like: two shared experts, no group limit, tied embeddings, rope_interleave
off; YaRN RoPE) and ``DeepseekV2ForCausalLM`` models in two (DeepSeek-V2-Lite's routing and YaRN:
greedy softmax top-k, a shared expert, a dense first layer; group_limited_greedy) are mapped to
Megatron-core names and loaded, strictly, into a Megatron-core MLA GPT built on
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
# YaRN as DeepSeek releases it, scaled down: SEQ (16) is beyond the original context (8), and
# mscale != mscale_all_dim so both the cos/sin factor and the softmax factor differ from 1.
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.9, "mscale_all_dim": 0.7}
VARIANTS.update({
    "v3_yarn": dict(q_lora_rank=24, n_shared_experts=0, n_group=1, topk_group=1, num_experts_per_tok=3,
                    first_k_dense_replace=0, rope_parameters=YARN),
    # transformers' DeepseekV2ForCausalLM ("_v2"): DeepSeek-V2-Lite's routing and YaRN (factor 40,
    # mscale = mscale_all_dim = 0.707), scaled down.
    "hfv2_lite": dict(_v2=True, q_lora_rank=None, n_shared_experts=1, num_experts_per_tok=3, first_k_dense_replace=1,
                      topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False,
                      rope_parameters={**YARN, "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707}),
    "hfv2_grouped": dict(_v2=True, q_lora_rank=24, n_shared_experts=0, n_routed_experts=16, n_group=4, topk_group=2,
                         topk_method="group_limited_greedy", num_experts_per_tok=3, first_k_dense_replace=0,
                         norm_topk_prob=False),
})
# Elastic k' checked on both sides per variant (all within supported_inference_k).
ELASTIC_K = {"v3": [5], "v2_lite": [2, 5, 8], "moonlight": [3, 8], "v3_yarn": [2, 6], "hfv2_lite": [1, 6],
             "hfv2_grouped": [2]}


def hf_config(name: str, variants: dict = VARIANTS):
    from transformers import DeepseekV2Config, DeepseekV3Config

    fields = {**BASE, **variants[name]}
    return (DeepseekV2Config if fields.pop("_v2", False) else DeepseekV3Config)(**fields)


def hf_model(name: str, variants: dict = VARIANTS):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_config(name, variants)).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * noise if "norm" in pname else 0.15 * noise)
        for layer in model.model.layers:  # a nonzero selection bias, so its mapping matters
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
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
        config = hf_config(name)
        fields = ds.megatron_fields(config)
        assert ds.hf_class_for(fields) == ("DeepseekV2ForCausalLM" if ds.is_v2(config) else "DeepseekV3ForCausalLM")
        back = type(config)(**ds.hf_config_kwargs(fields, rope_interleave=getattr(config, "rope_interleave", True)))
        for key in ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
                    "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim",
                    "num_experts_per_tok", "first_k_dense_replace", "rms_norm_eps", "tie_word_embeddings",
                    "rope_parameters", "rope_interleave", "vocab_size", "topk_method", "norm_topk_prob"):
            assert getattr(back, key, None) == getattr(config, key, None), (name, key)
        if ds.group_limit_is_active(config):
            assert (back.n_group, back.topk_group) == (config.n_group, config.topk_group)
    v3 = ds.megatron_fields(DeepseekV3Config(**{**BASE, **VARIANTS["v3"]}))
    assert v3["moe_layer_freq"] == [0, 1, 1] and v3["moe_shared_expert_intermediate_size"] == 16
    assert v3["num_moe_experts"] == 16
    assert (v3["moe_router_num_groups"], v3["moe_router_group_topk"]) == (4, 2)
    moon = ds.megatron_fields(DeepseekV3Config(**{**BASE, **VARIANTS["moonlight"]}))
    assert moon["moe_router_num_groups"] is None and moon["moe_shared_expert_intermediate_size"] == 32
    lite = ds.megatron_fields(hf_config("hfv2_lite"))
    assert (lite["moe_router_score_function"], lite["moe_router_pre_softmax"], lite["moe_router_enable_expert_bias"]) \
        == ("softmax", True, False)
    assert {k: lite[k] for k in ("rope_type", *ds.YARN_KEYS)} == {
        "rope_type": "yarn", "rotary_scaling_factor": 40.0, "original_max_position_embeddings": 8, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}
    grouped = ds.megatron_fields(hf_config("hfv2_grouped"))
    assert (grouped["moe_router_num_groups"], grouped["moe_router_group_topk"]) == (4, 2)
    # transformers ignores mscale without mscale_all_dim: Megatron gets the (1, 0) that reproduces it.
    alone = DeepseekV3Config(**{**BASE, **VARIANTS["v3_yarn"], "rope_parameters": {**YARN, "mscale_all_dim": None}})
    assert (ds.yarn_fields(alone)["mscale"], ds.yarn_fields(alone)["mscale_all_dim"]) == (1.0, 0.0)


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
    if ds.yarn_fields(hf.config)["rope_type"] == "yarn":
        # YaRN matters at this length: the same weights with plain RoPE (or YaRN without the
        # mscale attention factors) do not reproduce transformers' logits.
        set_k(hf, meg, k_train)
        for wrong in ({"rope_type": "rope"}, {"mscale": 1.0, "mscale_all_dim": 0.0}):
            plain = megatron_model({**ds.megatron_fields(hf.config), **wrong})
            plain.load_state_dict(ds.hf_to_megatron(hf_state(hf), shape), strict=True)
            set_k(hf, plain, k_train)
            assert float((base - logits_pair(hf, plain)[1]).abs().max()) > 100 * TOL, wrong

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
        (dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}), "RoPE scaling 'linear'"),
        (dict(rope_parameters={**YARN, "mscale": None}), "mscale_all_dim=0.7 without mscale"),
        (dict(rope_parameters={**YARN, "truncate": False}), "truncate=false"),
        (dict(rope_parameters={**YARN, "attention_factor": 1.5}), "attention_factor=1.5 differs"),
        (dict(rms_norm_eps=1e-5), "latent norms always use 1e-06"),
        (dict(norm_topk_prob=False), "norm_topk_prob=false"),
        (dict(attention_bias=True), "attention_bias=true"),
        (dict(num_experts_per_tok=2), "k=2 cannot be reproduced"),
    ]
    for extra, message in cases:
        with pytest.raises(ConversionError, match=message):
            ds.check_supported(DeepseekV3Config(**{**base, **extra}), "cfg.json")
    ds.check_supported(DeepseekV3Config(**base))
    v2 = {k: v for k, v in {**BASE, **VARIANTS["hfv2_grouped"]}.items() if k != "_v2"}
    from transformers import DeepseekV2Config

    for extra, message in [(dict(norm_topk_prob=True), "norm_topk_prob=true .* ambiguous"),
                           (dict(topk_method="noaux_tc"), "topk_method='noaux_tc'"),
                           (dict(mlp_bias=True), "mlp_bias=true"),
                           # V2 ranks groups by their best expert: Megatron only where k // topk_group == 1.
                           (dict(num_experts_per_tok=4), r"top-1, .*k // topk_group == 1.*Supported k: 2-3")]:
        with pytest.raises(ConversionError, match=message):
            ds.check_supported(DeepseekV2Config(**{**v2, **extra}), "cfg.json")
    assert ds.supported_inference_k(hf_config("hfv2_lite")) == list(range(1, 9))  # greedy: every k, k = 1 too


def test_export_refuses_what_transformers_cannot_express():
    fields = ds.megatron_fields(hf_config("v3_yarn"))
    with pytest.raises(ConversionError, match=r"yarn mscale=0.9 with mscale_all_dim=0: transformers ignores mscale"):
        ds.hf_rope_parameters({**fields, "mscale_all_dim": 0.0})
    assert ds.hf_rope_parameters({**fields, "mscale": 1.0, "mscale_all_dim": 0.0})["mscale"] == 1.0
    # Mixtral-style renormalised softmax is neither DeepSeek router.
    with pytest.raises(ConversionError, match="DeepSeek-V3 routes with sigmoid .* DeepSeek-V2 with a softmax"):
        ds.hf_class_for({"moe_router_score_function": "softmax", "moe_router_pre_softmax": False})


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
    extra["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(2)
    with pytest.raises(ConversionError, match="does not use.*inv_freq"):
        ds.hf_to_megatron(extra, shape)
    # Multi-token-prediction layers (numbered from num_hidden_layers on) are not part of the model.
    mtp = {"model.layers.3.eh_proj.weight": torch.zeros(2, 2), "model.layers.3.self_attn.q_proj.weight": torch.zeros(2)}
    assert ds.mtp_tensor_names({**state, **mtp}, shape) == sorted(mtp)
    skipped = ds.hf_to_megatron({**state, **mtp}, shape)
    assert all(torch.equal(skipped[k], v) for k, v in ds.hf_to_megatron(state, shape).items())


def test_fp8_blocks_dequantize_to_weight_times_scale():
    """DeepSeek's fp8 layout: one fp32 scale_inv per (rows x cols) block, partial blocks at the edges."""
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(20, 13, generator=g) * 100).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 2, generator=g) + 0.5  # 8x8 blocks: ceil(20/8) x ceil(13/8)
    out = ds.dequantize_fp8(weight, scale, (8, 8))
    assert out.dtype == torch.float32
    for r in range(20):
        for c in range(13):
            assert out[r, c] == weight[r, c].float() * scale[r // 8, c // 8]
    with pytest.raises(ShapeMismatchError, match=r"does not tile weight \(20, 13\) in 8x8 blocks"):
        ds.dequantize_fp8(weight, scale[:2], (8, 8))
