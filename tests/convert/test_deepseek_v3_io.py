"""DeepSeek-V2/V3 import and export through the converters' entry points (convert/deepseek_v3_io.py,
reached from from_hf.convert_hf_to_megatron and to_hf.convert_megatron_to_hf): HF -> Megatron ->
HF bit-identical (for rope_interleave: true, DeepSeek's layout; a rope_interleave: false source
comes back in that layout, rope rows reordered, same logits), the imported project model (MLA, ElasticRouter with the expert bias, group-limited
top-k, gate scale) reproducing HF's logits at k_train and at k' set on both sides, an elastic recipe
from the import, the refusals, and released-checkpoint extras (YaRN, DeepseekV2ForCausalLM,
multi-token-prediction layers skipped, block-wise fp8 weights dequantized).
"""

from __future__ import annotations

import json

import pytest
import torch

from conversion_helpers import read_safetensors, record_diff
from test_deepseek_v3 import SEQ, TOL, VARIANTS, hf_model, tokens
from megatron_elastic.convert import ConversionError

IMPORTABLE = {
    # V3's own shape: a shared expert and a dense first layer (moe_shared_expert_intermediate_size,
    # moe_layer_freq), grouped routing with expert bias.
    "shared_dense": VARIANTS["v3"],
    "grouped": dict(q_lora_rank=24, n_shared_experts=0, n_routed_experts=16, n_group=4, topk_group=2,
                    num_experts_per_tok=4, first_k_dense_replace=0),
    "plain_rope": dict(q_lora_rank=None, n_shared_experts=0, n_group=1, topk_group=1, num_experts_per_tok=3,
                       first_k_dense_replace=0, rope_interleave=False, tie_word_embeddings=True),
    "v3_yarn": VARIANTS["v3_yarn"],
    # DeepseekV2ForCausalLM shaped like DeepSeek-V2-Lite: greedy softmax routing, YaRN, a shared
    # expert and a dense first layer.
    "hfv2_lite": {**VARIANTS["hfv2_lite"], "n_group": 1, "topk_group": 1},  # as V2-Lite's config.json
}
ELASTIC_K = {"shared_dense": [5], "grouped": [5], "plain_rope": [2, 6], "v3_yarn": [6], "hfv2_lite": [1, 6]}


def saved_hf(name: str, root, variants=IMPORTABLE):
    model = hf_model(name, variants)
    directory = root / f"hf_{name}"
    model.save_pretrained(str(directory))
    return model, directory


def project_logits(model, k) -> torch.Tensor:
    from megatron_elastic.moe.control import set_inference_k

    model.eval()
    set_inference_k(model, k)
    with torch.no_grad():
        return model(tokens(), torch.arange(SEQ).expand(2, -1), None).float()


def hf_logits(model, k) -> torch.Tensor:
    from megatron_elastic.convert.hf_elastic import set_hf_inference_k

    set_hf_inference_k(model, k)
    with torch.no_grad():
        return model(input_ids=tokens()).logits.float()


def load_imported(out, *overrides):
    from megatron_elastic.config import load_config
    from megatron_elastic.device import seed_all
    from megatron_elastic.models.gpt import build_model
    from megatron_elastic.training.checkpoint import load_checkpoint

    cfg = load_config(out / "megatron_config.yaml", list(overrides))
    seed_all(cfg.train.seed)
    model = build_model(cfg, cfg.model.vocab_size)
    load_checkpoint(out, model, None, cfg, finetune=True)
    return cfg, model


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(IMPORTABLE))
def test_import_matches_hf_and_export_is_bit_identical(one_process_parallel, tmp_path, name):
    from megatron_elastic.convert.from_hf import convert_hf_to_megatron
    from megatron_elastic.convert.to_hf import convert_megatron_to_hf

    hf, directory = saved_hf(name, tmp_path)
    result = convert_hf_to_megatron(directory, tmp_path / "imported", progress=False)
    v2 = name.startswith("hfv2")
    arch = "deepseek_v2" if v2 else "deepseek_v3"
    assert result.architecture == arch
    cfg, model = load_imported(tmp_path / "imported")
    m = cfg.model
    assert m.multi_latent_attention and m.num_query_groups == m.num_attention_heads
    assert m.moe_router_enable_expert_bias != v2
    assert m.rope_type == ("yarn" if "yarn" in str(hf.config.rope_parameters) else "rope")
    k_train = hf.config.num_experts_per_tok
    for k in [None, *ELASTIC_K[name]]:
        diff = record_diff(f"deepseek import {name} k={k}", project_logits(model, k), hf_logits(hf, k or k_train))
        assert diff < TOL, (k, diff)
    # k' changes the outputs, so agreeing at each k is not vacuous.
    assert float((project_logits(model, None) - project_logits(model, ELASTIC_K[name][-1])).abs().max()) > 100 * TOL

    back = tmp_path / "back"
    exported = convert_megatron_to_hf(tmp_path / "imported", back, tokenizer_model=False, progress=False)
    assert exported.architecture == arch
    original, again = read_safetensors(directory), read_safetensors(back)
    assert sorted(original) == sorted(again)
    expected = dict(original)
    if not getattr(hf.config, "rope_interleave", True):
        # Exported in Megatron's own RoPE layout (rope_interleave: true): the rope rows of the query
        # and of kv_a_proj_with_mqa are reordered, every other tensor is bit-identical.
        from megatron_elastic.convert import deepseek_v3 as ds

        shape = ds.shape_from_hf(hf.config)
        for key in expected:
            kind = "kv_a" if key.endswith("kv_a_proj_with_mqa.weight") else "q" if key.endswith(
                ("q_proj.weight", "q_b_proj.weight")) else None
            if kind:
                expected[key] = ds.megatron_rope_rows(original[key], shape, kind)
                assert not torch.equal(expected[key], original[key]), key
    for key, tensor in expected.items():
        assert again[key].dtype == tensor.dtype and torch.equal(again[key], tensor), key
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(back)).eval()
    diff = record_diff(f"deepseek export {name}", hf_logits(reloaded, None), hf_logits(hf, k_train))
    assert diff < TOL, diff
    before, after = (json.loads((d / "config.json").read_text()) for d in (directory, back))
    for key in ("architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                "n_routed_experts", "n_shared_experts", "moe_intermediate_size", "num_experts_per_tok",
                "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace",
                "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "max_position_embeddings",
                "topk_method"):
        assert after.get(key) == before.get(key), key
    if not v2:
        assert after["rope_interleave"] is True and after["num_nextn_predict_layers"] == 0
    assert after["elastic_moe"]["k_train"] == k_train


@pytest.mark.slow
def test_elastic_recipe_trains_from_the_import(one_process_parallel, tmp_path):
    """The imported recipe with a layerwise k schedule within one group width runs a training step
    (expert bias, grouped routing and MLA backward through ElasticRouter)."""
    from megatron_elastic.config import ConfigError

    _, directory = saved_hf("grouped", tmp_path)
    from megatron_elastic.convert.from_hf import convert_hf_to_megatron

    convert_hf_to_megatron(directory, tmp_path / "imported", progress=False)
    cfg, model = load_imported(tmp_path / "imported", "elastic.schedule=layerwise", "elastic.k_min=4",
                               "elastic.k_max=5")
    model.train()
    ids = tokens()
    loss = model(ids, torch.arange(SEQ).expand(2, -1), None, labels=torch.roll(ids, -1, 1)).float().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # A k range whose group width (k // group_topk) changes is refused before anything is built.
    with pytest.raises(ConfigError, match=r"groups a token may use would change with k.*\[4, 5\]"):
        load_imported(tmp_path / "imported", "elastic.schedule=layerwise", "elastic.k_min=2", "elastic.k_max=5")


@pytest.mark.slow
def test_v2_recipe_trains_from_the_import(one_process_parallel, tmp_path):
    """A DeepseekV2ForCausalLM import (pre-softmax router with its aux loss, YaRN) trains with an
    elastic layerwise k down to 1."""
    from megatron_elastic.convert.from_hf import convert_hf_to_megatron

    _, directory = saved_hf("hfv2_lite", tmp_path)
    convert_hf_to_megatron(directory, tmp_path / "imported", progress=False)
    cfg, model = load_imported(tmp_path / "imported", "elastic.schedule=layerwise", "elastic.k_min=1",
                               "elastic.k_max=6")
    assert cfg.model.moe_router_load_balancing_type == "aux_loss" and cfg.model.moe_aux_loss_coeff == 0.001
    model.train()
    ids = tokens()
    loss = model(ids, torch.arange(SEQ).expand(2, -1), None, labels=torch.roll(ids, -1, 1)).float().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_unsupported_deepseek_configs_are_refused_before_anything_is_written(tmp_path):
    from megatron_elastic.convert.from_hf import convert_hf_to_megatron

    linear = {"linear": {**IMPORTABLE["grouped"], "rope_parameters": {
        "rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}}
    _, directory = saved_hf("linear", tmp_path, linear)
    with pytest.raises(ConversionError, match="RoPE scaling 'linear'"):
        convert_hf_to_megatron(directory, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_mla_checkpoint_refuses_other_architectures():
    from megatron_elastic.config import Config
    from megatron_elastic.convert.hf_config import choose_architecture

    cfg = Config.from_dict({"model": dict(num_attention_heads=4, num_query_groups=4, multi_latent_attention=True,
                                          kv_lora_rank=8, qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=8,
                                          qk_layernorm=True)}, source="t").validate()
    with pytest.raises(ConversionError, match="multi-latent attention: export it as deepseek_v3"):
        choose_architecture(cfg, "auto")


@pytest.mark.slow
def test_megatron_mla_model_exports_with_its_schedule(one_process_parallel, tmp_path):
    """A model built here (MLA, sigmoid router without expert bias, gate scale, layerwise k in
    [2, 4]) exports as DeepseekV3ForCausalLM reproducing Megatron's logits at the default k
    (k_max) and at other k', with its schedule under elastic_moe."""
    from transformers import AutoModelForCausalLM

    from conversion_helpers import perturb_norms
    from megatron_elastic.config import Config
    from megatron_elastic.convert.to_hf import convert_megatron_to_hf
    from megatron_elastic.device import seed_all
    from megatron_elastic.models.gpt import build_model
    from megatron_elastic.training.checkpoint import save_checkpoint

    cfg = Config.from_dict({"model": dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=4, multi_latent_attention=True,
        q_lora_rank=16, kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=8, qk_layernorm=True,
        num_moe_experts=8, moe_ffn_hidden_size=16, moe_router_topk=4, moe_router_score_function="sigmoid",
        moe_router_topk_scaling_factor=1.5, norm_epsilon=1e-6, vocab_size=96, seq_length=SEQ,
        max_position_embeddings=64, init_method_std=0.2),
        "elastic": {"schedule": "layerwise", "k_min": 2, "k_max": 4}}, source="test").validate()
    seed_all(3)
    model = build_model(cfg, 96)
    perturb_norms(model)
    save_checkpoint(tmp_path / "ckpt", model, None, cfg, 0)
    convert_megatron_to_hf(tmp_path / "ckpt", tmp_path / "hf", tokenizer_model=False, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM" and hf.config.num_experts_per_tok == 4
    assert hf.config.elastic_moe["schedule"] == "layerwise" and hf.config.elastic_moe["k_min"] == 2
    assert not any(layer.mlp.gate.e_score_correction_bias.any() for layer in hf.model.layers)
    for k in (None, 2, 3):
        diff = record_diff(f"deepseek export native k={k}", project_logits(model, k), hf_logits(hf, k))
        assert diff < TOL, (k, diff)


def ep2_logits_worker(rank, world_size, imported):
    """Rank of an expert-parallel (EP = 2) load of an imported DeepSeek checkpoint."""
    from pathlib import Path

    from megatron_elastic import parallel
    from megatron_elastic.config import load_config

    parallel.initialize(load_config(Path(imported) / "megatron_config.yaml"))
    try:
        _, model = load_imported(Path(imported))
        assert len(model.decoder.layers[0].mlp.experts.local_experts) == 8  # 16 experts over 2 ranks
        return {str(k): project_logits(model, k) for k in (None, 5)}
    finally:
        parallel.destroy()


@pytest.mark.slow
@pytest.mark.multiproc
def test_import_loads_expert_parallel(tmp_path):
    """The recipe's EP = 2 layout loads the one-process import (dist_checkpointing reshards) and the
    two ranks reproduce HF's logits with grouped routing and the expert bias."""
    from helpers import run_distributed
    from megatron_elastic.convert.from_hf import convert_hf_to_megatron

    hf, directory = saved_hf("grouped", tmp_path)
    convert_hf_to_megatron(directory, tmp_path / "imported", expert_model_parallel_size=2, progress=False)
    ranks = run_distributed(ep2_logits_worker, 2, str(tmp_path / "imported"), tmp_dir=tmp_path)
    for rank in ranks:
        for k in (None, 5):
            diff = record_diff(f"deepseek import grouped EP=2 k={k}", rank[str(k)], hf_logits(hf, k or 4))
            assert diff < TOL, (k, diff)


def released_layout(directory, shape, block=(8, 8)):
    """Rewrite a save_pretrained directory the way DeepSeek releases V3: one multi-token-prediction
    layer (layer index num_hidden_layers, with its eh_proj / enorm / hnorm) and every projection
    stored as float8_e4m3fn with a per-block fp32 weight_scale_inv. Returns the dequantized weights
    the import must see."""
    from safetensors.torch import save_file

    state = read_safetensors(directory)
    mtp = f"model.layers.{shape.num_layers}."
    for key in [k for k in state if k.startswith("model.layers.0.")]:
        state[key.replace("model.layers.0.", mtp)] = state[key].clone()
    h = shape.hidden_size
    state.update({mtp + "eh_proj.weight": torch.randn(h, 2 * h), mtp + "enorm.weight": torch.ones(h),
                  mtp + "hnorm.weight": torch.ones(h)})
    expected = {}
    g = torch.Generator().manual_seed(11)
    for key in [k for k in state if k.endswith("_proj.weight") and state[k].numel()]:
        w = state[key]
        scale = 0.5 + torch.rand(-(-w.shape[0] // block[0]), -(-w.shape[1] // block[1]), generator=g)
        full = scale.repeat_interleave(block[0], 0)[: w.shape[0]].repeat_interleave(block[1], 1)[:, : w.shape[1]]
        state[key] = (w / full).to(torch.float8_e4m3fn)
        state[key + "_scale_inv"] = scale
        expected[key] = state[key].float() * full
    (directory / "model.safetensors").unlink()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config.update(num_nextn_predict_layers=1, quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)})
    (directory / "config.json").write_text(json.dumps(config))
    return expected


@pytest.mark.slow
def test_released_checkpoint_with_mtp_and_fp8_imports(one_process_parallel, tmp_path, capsys):
    """A V3 directory as DeepSeek releases it (MTP layer, fp8 blocks, YaRN): the MTP tensors are
    skipped with a note, the fp8 weights land dequantized (weight * scale_inv per block, exactly),
    and the export writes plain weights, num_nextn_predict_layers 0 and no quantization_config."""
    from megatron_elastic.convert import deepseek_v3 as ds
    from megatron_elastic.convert.from_hf import convert_hf_to_megatron
    from megatron_elastic.convert.to_hf import convert_megatron_to_hf

    hf, directory = saved_hf("v3_yarn", tmp_path)
    original = read_safetensors(directory)
    shape = ds.shape_from_hf(hf.config)
    expected = released_layout(directory, shape)
    convert_hf_to_megatron(directory, tmp_path / "imported", progress=False)
    # The MTP layer's weights, fp8 scales, eh_proj and norms.
    skipped = len([k for k in read_safetensors(directory) if k.startswith(f"model.layers.{shape.num_layers}.")])
    assert skipped > len([k for k in original if k.startswith("model.layers.0.")]) + 3  # + scales
    assert f"skipped {skipped} tensors of 1 multi-token-prediction layer(s)" in capsys.readouterr().out
    convert_megatron_to_hf(tmp_path / "imported", tmp_path / "back", tokenizer_model=False, progress=False)
    again = read_safetensors(tmp_path / "back")
    assert sorted(again) == sorted(original)  # no MTP layer, no scales
    for key, tensor in again.items():
        want = expected.get(key, original[key])
        assert tensor.dtype == torch.float32 and torch.equal(tensor, want), key
    assert any(not torch.equal(expected[k], original[k]) for k in expected)  # fp8 rounding happened
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0 and "quantization_config" not in config


@pytest.mark.slow
def test_fp8_weight_without_its_scale_is_refused(one_process_parallel, tmp_path):
    from safetensors.torch import save_file

    from megatron_elastic.convert import deepseek_v3 as ds
    from megatron_elastic.convert.from_hf import convert_hf_to_megatron

    hf, directory = saved_hf("v3_yarn", tmp_path)
    released_layout(directory, ds.shape_from_hf(hf.config))
    state = read_safetensors(directory)
    del state["model.layers.1.self_attn.o_proj.weight_scale_inv"]
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"o_proj.weight is stored as torch.float8_e4m3fn without"):
        convert_hf_to_megatron(directory, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_quantization_is_refused(tmp_path):
    from megatron_elastic.convert.from_hf import convert_hf_to_megatron

    _, directory = saved_hf("grouped", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="only DeepSeek's block-wise fp8"):
        convert_hf_to_megatron(directory, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# The released config.json files (architecture fields as published; legacy rope_scaling).
V2_LITE_CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "attention_bias": False,
    "aux_loss_alpha": 0.001, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 1408,
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
    "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "v_head_dim": 128, "vocab_size": 102400}
V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_group": 4,
    "topk_method": "noaux_tc", "v_head_dim": 128, "vocab_size": 129280}


@pytest.mark.parametrize("raw", [V2_LITE_CONFIG, V3_CONFIG], ids=["v2_lite", "v3"])
def test_released_configs_map_to_a_recipe(tmp_path, raw):
    """DeepSeek-V2-Lite's and DeepSeek-V3's own config.json (published values): YaRN, routing, fp8,
    MTP, shared experts and dense first layers all map to a recipe's model section."""
    from transformers import AutoConfig

    from megatron_elastic.convert import deepseek_v3 as ds
    from megatron_elastic.convert import deepseek_v3_io as io
    from megatron_elastic.convert.mapping import architecture_from_hf_config

    (tmp_path / "config.json").write_text(json.dumps(raw))
    hf = AutoConfig.from_pretrained(str(tmp_path))
    assert architecture_from_hf_config(raw) == ("deepseek_v2" if ds.is_v2(hf) else "deepseek_v3")
    ds.check_supported(hf)
    f = ds.megatron_fields(hf)
    assert (f["rope_type"], f["rotary_scaling_factor"], f["original_max_position_embeddings"]) == ("yarn", 40.0, 4096)
    assert f["mscale_all_dim"] == raw["rope_scaling"]["mscale_all_dim"]
    assert ds.fp8_block_size(hf) == ((128, 128) if "quantization_config" in raw else None)
    if ds.is_v2(hf):
        assert ds.supported_inference_k(hf) == list(range(1, 65))
    else:
        assert ds.supported_inference_k(hf) == [8, 9, 10, 11]
    model = io.recipe_model_section(hf, "config.json")
    assert model["rope_type"] == "yarn"
    assert model["moe_shared_expert_intermediate_size"] == raw["n_shared_experts"] * raw["moe_intermediate_size"]
    assert model["moe_layer_freq"][:raw["first_k_dense_replace"] + 1] == [0] * raw["first_k_dense_replace"] + [1]
