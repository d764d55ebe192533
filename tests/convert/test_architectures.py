"""Qwen2-MoE (gated shared expert, q/k/v biases, a dense layer), OLMoE (QK-norm over the whole q / k
projection) and Qwen3-MoE with dense layers: HF -> Megatron (expert parallel 2) -> HF bit for bit,
logits equal on both sides at k_train and at k' set through each side's k control, an elastic
recipe training the shared-expert model, and the refusals of what is not mapped.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conversion_helpers import (
    ARCH_K_CHECKS,
    TOL,
    hf_model_logits,
    hf_olmoe,
    hf_qwen2,
    read_safetensors,
    record_diff,
    sample_tokens,
)

ARCH_OF = {"qwen2": "qwen2_moe", "olmoe": "olmoe", "qwen3_mixed": "qwen3_moe"}
MOE_LAYERS = {"qwen2": [0, 2], "olmoe": [0, 1], "qwen3_mixed": [1, 3]}


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["qwen2", "olmoe", "qwen3_mixed"])
def test_round_trip_through_expert_parallel_and_logits(archs, tmp_path, name):
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_elastic.config import load_config
    from megatron_elastic.convert.hf_config import hf_moe_pattern
    from megatron_elastic.convert.hf_elastic import get_hf_inference_k, set_hf_inference_k
    from megatron_elastic.convert.to_hf import convert_megatron_to_hf

    root, (first, second) = archs["root"], archs["ep2"]
    recipe = load_config(root / f"imported_{name}" / "megatron_config.yaml")
    assert recipe.model.moe_layers == MOE_LAYERS[name]
    assert first[f"{name}_local_experts"] == 2  # really split over two expert-parallel ranks

    # HF -> Megatron -> (re-saved under EP=2) -> HF: every tensor bit for bit.
    out = tmp_path / "back"
    result = convert_megatron_to_hf(root / f"ep2_{name}", out, progress=False)
    assert result.architecture == ARCH_OF[name]
    original, back = read_safetensors(root / f"hf_{name}"), read_safetensors(out)
    assert sorted(original) == sorted(back)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    before = AutoConfig.from_pretrained(str(root / f"hf_{name}"))
    after = AutoConfig.from_pretrained(str(out))
    assert hf_moe_pattern(after, ARCH_OF[name]) == hf_moe_pattern(before, ARCH_OF[name])
    for key in ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "num_experts_per_tok", "num_experts", "intermediate_size", "moe_intermediate_size",
                "shared_expert_intermediate_size", "qkv_bias", "norm_topk_prob", "rms_norm_eps",
                "tie_word_embeddings", "clip_qkv", "attention_bias"):
        assert getattr(after, key, None) == getattr(before, key, None), key

    # Logits: the Megatron model under EP=2 (elastic eval k) against the source HF model and the
    # exported one (set_hf_inference_k), at k_train and k' (global and one per MoE layer).
    exported = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert get_hf_inference_k(exported) == [2] * len(MOE_LAYERS[name])
    megatron = first[name]
    assert all((megatron[k] - second[name][k]).abs().max() < 1e-5 for k in megatron)
    for k in ARCH_K_CHECKS[name]:
        key = json.dumps(k)
        diff = record_diff(f"{name} import k={k}", megatron[key], archs["hf"][name][key])
        assert diff < TOL, (k, diff)
        diff = record_diff(f"{name} export k={k}", hf_model_logits(exported, k), megatron[key])
        assert diff < TOL, (k, diff)
    # The checks can fail: changing k' moves the logits by far more than the tolerance.
    assert (megatron[json.dumps(1)] - megatron[json.dumps(None)]).abs().max() > 100 * TOL
    with pytest.raises(ValueError, match="one k per MoE layer"):
        set_hf_inference_k(exported, [1] * 5)


@pytest.mark.slow
@pytest.mark.multiproc
def test_elastic_recipe_trains_shared_expert_model_with_dense_layer(archs):
    first, second = archs["ep2"]
    assert first["train_iteration"] == 3 and len(first["train_losses"]) == 3
    assert first["train_losses"] == second["train_losses"]
    assert all(math.isfinite(loss) for loss in first["train_losses"])
    assert first["train_losses"][0] != first["train_losses"][-1]
    # The shared expert's gate trained (it is always on, whatever k the schedule drew).
    source = read_safetensors(archs["root"] / "hf_qwen2")["model.layers.0.mlp.shared_expert_gate.weight"]
    assert (first["trained_shared_gate"] - source).abs().max() > 1e-6
    assert torch.isfinite(first["trained"]).all()


@pytest.mark.slow
@pytest.mark.multiproc
def test_per_moe_layer_inference_k_recorded_and_applied(archs, tmp_path):
    """``--inference-k`` lists one k per MoE layer (the dense layer has none); load_elastic_hf
    applies it to the exported Qwen2-MoE and reproduces the Megatron logits at that budget."""
    from megatron_elastic.convert import ConversionError
    from megatron_elastic.convert.hf_elastic import get_hf_inference_k, load_elastic_hf
    from megatron_elastic.convert.to_hf import convert_megatron_to_hf

    root = archs["root"]
    with pytest.raises(ConversionError, match=r"one k per MoE layer \(2: layers \[0, 2\] in depth order"):
        convert_megatron_to_hf(root / "ep2_qwen2", tmp_path / "bad", inference_k=[3, 1, 2], progress=False)
    out = tmp_path / "budget"
    convert_megatron_to_hf(root / "ep2_qwen2", out, inference_k=[3, 1], progress=False)
    assert json.loads((out / "config.json").read_text())["elastic_moe"]["inference_k"] == [3, 1]
    model = load_elastic_hf(str(out))
    assert get_hf_inference_k(model) == [3, 1]
    with torch.no_grad():
        logits = model(input_ids=sample_tokens()).logits.float()
    diff = record_diff("qwen2 export inference_k=[3, 1]", logits, archs["ep2"][0]["qwen2"][json.dumps([3, 1])])
    assert diff < TOL


# ------------------------------------------------------------------------------ refusals
def _edited(base, directory, **config):
    shutil.copytree(base, directory)
    raw = json.loads((directory / "config.json").read_text())
    raw.update(config)
    (directory / "config.json").write_text(json.dumps(raw))
    return directory


def test_import_refuses_what_is_not_mapped(tmp_path):
    from megatron_elastic.convert import ConversionError
    from megatron_elastic.convert.from_hf import convert_hf_to_megatron

    olmoe, qwen2 = tmp_path / "olmoe", tmp_path / "qwen2"
    hf_olmoe().save_pretrained(str(olmoe))
    hf_qwen2().save_pretrained(str(qwen2))
    cases = [
        (olmoe, {"clip_qkv": 8.0}, "clip_qkv=8.0"),
        (olmoe, {"attention_bias": True}, "attention_bias=true"),
        (olmoe, {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "RoPE scaling"),
        (qwen2, {"use_sliding_window": True, "sliding_window": 16}, "sliding"),
        (qwen2, {"layer_types": ["full_attention", "sliding_attention", "full_attention"]}, "layer_types="),
        (qwen2, {"mlp_only_layers": [0, 1, 2]}, "leave no MoE layer"),
        (qwen2, {"hidden_act": "gelu"}, "hidden_act=gelu"),
        # config.json says no q/k/v biases but the weights have them: never silently dropped.
        (qwen2, {"qkv_bias": False}, r"does not convert: model\.layers\.0\.self_attn\.k_proj\.bias"),
        # layer 1 claimed MoE but stored dense.
        (qwen2, {"mlp_only_layers": []}, r"missing .*model\.layers\.1\.mlp\.shared_expert\.gate_proj\.weight"),
    ]
    for i, (base, config, match) in enumerate(cases):
        with pytest.raises(ConversionError, match=match):
            convert_hf_to_megatron(_edited(base, tmp_path / f"case{i}", **config), tmp_path / f"o{i}", progress=False)
        assert not (tmp_path / f"o{i}").exists()
    # OLMoE's projection-wide QK-norm spans all heads: no tensor parallelism.
    with pytest.raises(ConversionError, match="qk_norm_scope=projection.*tensor_model_parallel_size=1"):
        convert_hf_to_megatron(olmoe, tmp_path / "tp2", tensor_model_parallel_size=2, progress=False)
