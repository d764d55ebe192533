"""Hugging Face -> Megatron import (convert/from_hf.py, with convert/hf_reader.py and
convert/hf_config.py): bit-identical round trips, the imported model's logits, an elastic recipe
training from the import, and the import's errors.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from conversion_helpers import TOL, hf_mixtral, load_tool, read_safetensors, record_diff


# ------------------------------------------------------------------------------ HF -> Megatron
@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixtral", "qwen3"])
def test_hf_to_megatron_to_hf_is_bit_identical(conv, tmp_path, name):
    from megatron_elastic.config import load_config
    from megatron_elastic.convert.to_hf import convert_megatron_to_hf

    root = conv["root"]
    imported = root / f"imported_{name}"
    recipe = load_config(imported / "megatron_config.yaml")
    assert recipe.checkpoint.finetune and Path(recipe.checkpoint.load) == imported.resolve()
    assert recipe.parallel.expert_model_parallel_size == (2 if name == "mixtral" else 1)
    assert Path(recipe.data.tokenizer_model).is_file()
    out = tmp_path / "back"
    convert_megatron_to_hf(imported, out, progress=False)
    original, back = read_safetensors(root / f"hf_{name}"), read_safetensors(out)
    assert sorted(original) == sorted(back)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    before = json.loads((root / f"hf_{name}" / "config.json").read_text())
    after = json.loads((out / "config.json").read_text())
    # Mixtral's default head_dim is null (= hidden / heads); the export writes the value.
    for c in (before, after):
        c["head_dim"] = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    for key in ("architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "num_experts_per_tok", "num_local_experts", "num_experts",
                "intermediate_size", "moe_intermediate_size", "norm_topk_prob", "rms_norm_eps",
                "rope_parameters", "tie_word_embeddings", "max_position_embeddings", "eos_token_id"):
        if key in before:
            assert after.get(key) == before[key], key


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixtral", "qwen3"])
def test_imported_megatron_model_matches_hf_logits(conv, name):
    for k in (None, 1):
        key = json.dumps(k)
        diff = record_diff(f"import {name} k={k}", conv["single"][f"imported_{name}"][key], conv["hf"][name][key])
        assert diff < TOL, (k, diff)


@pytest.mark.slow
@pytest.mark.multiproc
def test_elastic_recipe_trains_from_imported_checkpoint(conv):
    first, second = conv["ep2"]
    assert first["train_iteration"] == 2 and len(first["train_losses"]) == 2
    assert first["train_losses"] == second["train_losses"]
    assert all(math.isfinite(loss) for loss in first["train_losses"])
    assert first["train_losses"][0] != first["train_losses"][1]



# ------------------------------------------------------------------------------ errors (import)
def _resave(directory: Path, edit) -> None:
    """Rewrite a one-file HF checkpoint with ``edit(tensors)`` applied."""
    from safetensors.torch import save_file

    tensors = read_safetensors(directory)
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_import_errors(tmp_path):
    from megatron_elastic.convert import (
        ConversionError, MissingTensorError, ShapeMismatchError, TargetExistsError, UnknownArchitectureError,
    )
    from megatron_elastic.convert.from_hf import convert_hf_to_megatron

    base = tmp_path / "mixtral"
    hf_mixtral().save_pretrained(str(base))

    def case(name, edit=None, config_edit=None):
        d = tmp_path / name
        shutil.copytree(base, d)
        if edit:
            _resave(d, edit)
        if config_edit:
            config = json.loads((d / "config.json").read_text())
            config_edit(config)
            (d / "config.json").write_text(json.dumps(config))
        return d

    def llama(c):
        c.update(architectures=["LlamaForCausalLM"], model_type="llama")

    with pytest.raises(UnknownArchitectureError, match="LlamaForCausalLM"):
        convert_hf_to_megatron(case("llama", config_edit=llama), tmp_path / "o1")
    missing = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    with pytest.raises(MissingTensorError, match=re.escape(missing)):
        convert_hf_to_megatron(case("missing", edit=lambda t: t.pop(missing)), tmp_path / "o2")
    bad = "model.layers.0.self_attn.k_proj.weight"
    with pytest.raises(ShapeMismatchError, match=re.escape(bad) + r".*\(8, 32\).*\(16, 32\)"):
        convert_hf_to_megatron(case("shape", edit=lambda t: t.update({bad: t[bad][:8]})), tmp_path / "o3")
    extra = "model.layers.0.mlp.shared_expert.gate_proj.weight"
    with pytest.raises(ConversionError, match=re.escape(extra)):
        convert_hf_to_megatron(case("extra", edit=lambda t: t.update({extra: torch.zeros(4, 32)})), tmp_path / "o4")
    with pytest.raises(ConversionError, match="sliding"):
        convert_hf_to_megatron(case("window", config_edit=lambda c: c.update(sliding_window=16)), tmp_path / "o5")
    with pytest.raises(ConversionError, match="tensor_model_parallel_size"):
        convert_hf_to_megatron(base, tmp_path / "o6", tensor_model_parallel_size=3)
    (tmp_path / "o7").mkdir()
    with pytest.raises(TargetExistsError, match="--overwrite"):
        convert_hf_to_megatron(base, tmp_path / "o7")
    assert list((tmp_path / "o7").iterdir()) == []
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))
    tool = load_tool("convert_from_hf")
    assert tool.main(["--hf-dir", str(tmp_path / "llama"), "--output", str(tmp_path / "o8")]) == 2
