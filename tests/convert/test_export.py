"""Megatron -> Hugging Face export (convert/to_hf.py, with the checkpoint reader
convert/megatron_checkpoint.py and the writer convert/hf_writer.py): expert- and tensor-parallel
checkpoints, QK-norm models as Qwen3-MoE, elastic metadata of a later iteration, the memory bound,
and the export's errors (missing tensors, shape mismatches, a checkpoint without its config,
interrupted saves).
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from conversion_helpers import (
    K_CHECKS,
    MAX_DIFFS,
    TOL,
    VOCAB,
    hf_model_logits,
    load_tool,
    read_safetensors,
    record_diff,
    sample_tokens,
)
from helpers import run_tool


# ------------------------------------------------------------------------------ Megatron -> HF
@pytest.mark.slow
@pytest.mark.multiproc
def test_export_expert_parallel_checkpoint_keeps_every_expert_and_logits(conv, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_elastic.convert import TargetExistsError
    from megatron_elastic.convert.megatron_checkpoint import find_checkpoint_dir, read_checkpoint_config
    from megatron_elastic.convert.to_hf import convert_megatron_to_hf, megatron_state_dict_to_hf

    root, out = conv["root"], tmp_path / "hf"
    assert all(r["local_experts"] == 2 for r in conv["ep2"])  # really split over two EP ranks
    assert (root / "ep2" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    result = convert_megatron_to_hf(root / "ep2", out, progress=False)  # exported in this one process
    assert result.iteration == 0 and result.architecture == "mixtral"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and "auto_map" not in config
    assert config["num_experts_per_tok"] == 2 and config["vocab_size"] == VOCAB

    # Every expert of both EP ranks is there, and each equals the 1-rank reference bit for bit.
    tensors = read_safetensors(out)
    experts = {(int(m[1]), int(m[2])) for n in tensors
               if (m := re.match(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w1\.weight$", n))}
    assert experts == {(i, j) for i in range(2) for j in range(4)}
    assert result.experts_per_layer == [4, 4]
    cfg, _, _ = read_checkpoint_config(find_checkpoint_dir(root / "ep2"))
    reference = megatron_state_dict_to_hf(conv["single"]["ep2_reference"], cfg)
    assert set(reference) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(tensor, reference[name]), name

    # Logits: transformers (no trust_remote_code) vs the EP=2 Megatron model, per k'.
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    megatron = conv["ep2"][0]["ep2"]
    # Both EP ranks ran the same tokens; their expert batches differ in row order, so equal up to
    # floating-point summation order.
    assert all((megatron[k] - conv["ep2"][1]["ep2"][k]).abs().max() < 1e-5 for k in megatron)
    for k in K_CHECKS:
        key = json.dumps(k)
        diff = record_diff(f"ep2 mixtral export k={k}", hf_model_logits(model, k), megatron[key])
        assert diff < TOL, (k, diff)
    # The check can fail: changing k' moves the logits by far more than the tolerance.
    assert (megatron[json.dumps(1)] - megatron[json.dumps(None)]).abs().max() > 100 * TOL

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    snippet = "def f(x):\n\treturn x ** 2  # square\n"
    assert tokenizer.decode(tokenizer.encode(snippet)) == snippet

    with pytest.raises(TargetExistsError, match="--overwrite"):
        convert_megatron_to_hf(root / "ep2", out, progress=False)
    again = convert_megatron_to_hf(root / "ep2" / "iter_0000000", out, overwrite=True, progress=False,
                                   dtype="bfloat16", tokenizer_model=False)
    assert again.iteration == 0 and not (out / "tokenizer.json").exists()
    assert read_safetensors(out)["lm_head.weight"].dtype == torch.bfloat16


@pytest.mark.slow
def test_export_tensor_parallel_sharded_checkpoint(conv, tmp_path):
    """A checkpoint whose weights are split over TP=2 / expert-TP=2 ranks is gathered exactly."""
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_elastic.convert.megatron_checkpoint import find_checkpoint_dir, read_checkpoint_config
    from megatron_elastic.convert.to_hf import convert_megatron_to_hf, megatron_state_dict_to_hf

    ckpt = find_checkpoint_dir(conv["root"] / "tp2")
    chunks = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert len(chunks["decoder.layers.self_attention.linear_qkv.weight"].chunks) == 2 * 2  # layers x TP
    assert len(chunks["decoder.layers.mlp.experts.experts.linear_fc1.weight"].chunks) == 2 * 4 * 4  # x gate/up x ETP
    cfg, iteration, _ = read_checkpoint_config(ckpt)
    assert iteration == 5 and cfg.parallel.tensor_model_parallel_size == 2
    out = tmp_path / "hf"
    convert_megatron_to_hf(conv["root"] / "tp2", out, progress=False)
    tensors = read_safetensors(out)
    reference = megatron_state_dict_to_hf(conv["single"]["ep2_reference"], cfg)
    assert set(tensors) == set(reference)
    for name, tensor in tensors.items():
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("pre_softmax", [False, True], ids=["norm_topk_prob", "no_norm_topk_prob"])
def test_export_qk_norm_model_as_qwen3_moe(conv, tmp_path, pre_softmax):
    from transformers import AutoModelForCausalLM

    from megatron_elastic.convert.hf_elastic import moe_routers
    from megatron_elastic.convert.to_hf import convert_megatron_to_hf

    out = tmp_path / "hf"
    result = convert_megatron_to_hf(conv["root"] / f"qwen_pre{int(pre_softmax)}", out, progress=False)
    assert result.architecture == "qwen3_moe"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    # Qwen3-MoE renormalises iff norm_topk_prob; Megatron iff not moe_router_pre_softmax.
    assert config["norm_topk_prob"] is (not pre_softmax)
    assert config["elastic_moe"]["moe_router_pre_softmax"] is pre_softmax
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    megatron = conv["single"][f"qwen_pre{int(pre_softmax)}"]
    for k in (None, 1, 3):
        diff = record_diff(f"qwen3 export pre_softmax={pre_softmax} k={k}", hf_model_logits(model, k), megatron[json.dumps(k)])
        assert diff < TOL, (k, diff)
    # The exported flag is what makes them equal: flipped, the same weights give other logits.
    for router in moe_routers(model):
        router.norm_topk_prob = not router.norm_topk_prob
    assert (hf_model_logits(model, 3) - megatron[json.dumps(3)]).abs().max() > 100 * TOL


@pytest.mark.slow
@pytest.mark.multiproc
def test_export_later_iteration_keeps_elastic_metadata(conv, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_elastic.convert.hf_elastic import get_hf_inference_k, load_elastic_hf
    from megatron_elastic.convert.to_hf import convert_megatron_to_hf

    trained = conv["root"] / "trained"
    assert (trained / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    out = tmp_path / "hf"
    result = convert_megatron_to_hf(trained, out, progress=False)  # optimizer state is skipped
    assert result.iteration == 2
    config = json.loads((out / "config.json").read_text())
    meta = config["elastic_moe"]
    # k_train: the one rule (config.ElasticConfig.k_train): k_max for a varying schedule.
    assert (meta["schedule"], meta["k_min"], meta["k_max"], meta["k_train"]) == ("layerwise", 1, 3, 3)
    assert meta["inference_k"] == [3, 1] and meta["iteration"] == 2 and meta["router_loss_coeff"] == 1e-3
    assert config["num_experts_per_tok"] == 3  # a varying schedule evaluates at k_max by default
    plain = AutoModelForCausalLM.from_pretrained(str(out))
    assert get_hf_inference_k(plain) == [3, 3]
    model = load_elastic_hf(str(out))  # applies the per-layer k recorded at export
    assert get_hf_inference_k(model) == [3, 1]
    with torch.no_grad():
        logits = model(input_ids=sample_tokens()).logits.float()
    diff = record_diff("iteration-2 export, per-layer k [3, 1]", logits, conv["ep2"][0]["trained"])
    assert diff < TOL
    # Training continued from the imported weights: two Adam steps at lr 1e-2 moved every tensor
    # by at most ~2e-2 (a fresh initialisation would differ by the weights' own scale, ~0.15).
    imported, exported = read_safetensors(conv["root"] / "hf_mixtral"), read_safetensors(out)
    moves = {name: float((exported[name] - imported[name]).abs().max()) for name in imported}
    assert max(moves.values()) < 0.05 and moves["model.embed_tokens.weight"] > 0



# ------------------------------------------------------------------------------ memory bound
@pytest.mark.slow
def test_export_memory_is_bounded_by_one_layer_plus_one_shard(conv, tmp_path):
    out = tmp_path / "hf"
    proc = run_tool("tools/convert_to_hf.py", "--load", str(conv["root"] / "big"), "--output", str(out),
                    "--max-shard-size", "3MB", "--report-memory", "--no-progress", "--no-tokenizer")
    text = proc.stdout
    group, shard, tracked = (float(x) for x in re.search(
        r"largest group ([\d.]+) MiB, largest shard buffer ([\d.]+) MiB, tracked peak ([\d.]+) MiB", text).groups())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 10 and all((out / s).is_file() for s in shards)
    total = conv["single"]["big_bytes"] / 2**20
    assert index["metadata"]["total_size"] == conv["single"]["big_bytes"]
    assert tracked <= group + shard + 0.05
    assert group < total / 8 and shard <= 3e6 / 2**20 + 0.01
    match = re.search(r"peak RSS above baseline: ([\d.]+) MiB", text)
    if match is None:
        pytest.skip("peak RSS cannot be measured here (/proc/self/clear_refs unavailable)")
    rss = float(match.group(1))
    MAX_DIFFS[f"memory: model {total:.1f} MiB, tracked {tracked:.1f} MiB, peak RSS +{rss:.1f} MiB"] = 0.0
    # A converter holding the model would need the whole `total`; this one needs a layer + a shard
    # (+ a few MiB of transient read buffers and allocator slack).
    assert rss < tracked + 8 and rss < total / 3, (rss, tracked, total)


# ------------------------------------------------------------------------------ errors (export)
@pytest.mark.slow
def test_export_errors_name_the_tensor(conv, tmp_path, capsys):
    import dataclasses

    from megatron_elastic.convert import MissingTensorError, ShapeMismatchError
    from megatron_elastic.convert.megatron_checkpoint import find_checkpoint_dir, read_checkpoint_config
    from megatron_elastic.convert.to_hf import convert_megatron_to_hf

    ckpt = conv["root"] / "ep2"
    cfg, _, _ = read_checkpoint_config(find_checkpoint_dir(ckpt))

    def variant(**model):
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))

    with pytest.raises(MissingTensorError, match=r"q_layernorm"):
        convert_megatron_to_hf(ckpt, tmp_path / "a", config=variant(qk_layernorm=True), progress=False)
    with pytest.raises(ShapeMismatchError,
                       match=r"decoder\.layers\.mlp\.experts\.experts\.linear_fc1\.weight.*\(2, 4, 64, 32\).*\(2, 4, 96, 32\)"):
        convert_megatron_to_hf(ckpt, tmp_path / "b", config=variant(moe_ffn_hidden_size=48), progress=False)
    with pytest.raises(ShapeMismatchError, match=r"router\.weight.*\(2, 4, 32\).*\(2, 8, 32\)"):
        convert_megatron_to_hf(ckpt, tmp_path / "c", config=variant(num_moe_experts=8), progress=False)
    assert not any((tmp_path / d).exists() for d in "abc")  # nothing written on failure

    # A checkpoint that does not record its config (another tool's, or metadata lost): clear error
    # naming the fix, and the export works once the config is given.
    bare = tmp_path / "bare"
    shutil.copytree(ckpt / "iter_0000000", bare)
    common = torch.load(bare / "common.pt", weights_only=False)
    del common["config"]
    torch.save(common, bare / "common.pt")
    (bare / "run_config.yaml").unlink()
    # Another tool's checkpoint has no manifest (with this one's, the edit above is damage and the
    # export refuses it, naming common.pt: tests/test_checkpoint_reliability.py).
    (bare / "manifest.json").unlink()
    tool = load_tool("convert_to_hf")
    assert tool.main(["--load", str(bare), "--output", str(tmp_path / "d"), "--no-progress"]) == 2
    assert "--config" in capsys.readouterr().err
    from megatron_elastic.config import save_config

    save_config(cfg, tmp_path / "recipe.yaml")
    assert tool.main(["--load", str(bare), "--output", str(tmp_path / "d"), "--no-progress",
                      "--config", str(tmp_path / "recipe.yaml")]) == 0


def test_incomplete_checkpoints_are_rejected(tmp_path):
    from megatron_elastic.convert import IncompleteCheckpointError
    from megatron_elastic.convert.to_hf import convert_megatron_to_hf

    only_partial = tmp_path / "run1"
    (only_partial / "iter_0000004.partial").mkdir(parents=True)
    with pytest.raises(IncompleteCheckpointError, match=r"iter_0000004\.partial"):
        convert_megatron_to_hf(only_partial, tmp_path / "out")
    with pytest.raises(IncompleteCheckpointError, match="interrupted save"):
        convert_megatron_to_hf(only_partial / "iter_0000004.partial", tmp_path / "out")
    cut = tmp_path / "run2" / "iter_0000006"  # data written, DCP's final .metadata never was
    cut.mkdir(parents=True)
    (cut / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (cut / "common.pt").write_bytes(b"")
    (tmp_path / "run2" / "latest_checkpointed_iteration.txt").write_text("6\n")
    with pytest.raises(IncompleteCheckpointError, match=r"missing \.metadata"):
        convert_megatron_to_hf(tmp_path / "run2", tmp_path / "out")
    (tmp_path / "run3").mkdir()
    with pytest.raises(IncompleteCheckpointError, match="no complete checkpoint"):
        convert_megatron_to_hf(tmp_path / "run3", tmp_path / "out")
    assert not (tmp_path / "out").exists()
