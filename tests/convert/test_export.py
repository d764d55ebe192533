"""Hugging Face conversion (issue 5): Megatron-core <-> Mixtral / Qwen3-MoE, elastic k in transformers.

The expensive part runs once per module (fixture ``conv``): random Mixtral and Qwen3-MoE models
built from configs through the transformers classes, the import CLI on one of them, then two
process launches:

* one process: the 1-rank reference of the expert-parallel model (also saved in a TP=2 sharded
  layout), two QK-norm models (one per router normalisation) saved as checkpoints with their
  logits, the Mixtral import, both imported models' logits, and a model spanning many shards for
  the memory check;
* two processes (expert parallel size 2): a model built and saved under EP=2 (iteration 0) with its
  logits at several k, then a few steps of an elastic recipe from the imported Mixtral checkpoint,
  saved at iteration 2 and reloaded for its logits.

Everything on the Hugging Face side (exports, transformers models, comparisons) runs in the test
process. Weights use ``init_method_std=0.2`` and perturbed norm weights so logits are of order 1:
a wrong mapping (swapped gate/up, a norm or k not carried over) moves them far beyond 1e-4, which
each test also checks by comparing k values against each other.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import sys
import zlib
from pathlib import Path

import pytest
import torch

from helpers import REPO, run_distributed, run_tool, tiny_overrides

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SMOKE = REPO / "configs" / "smoke.yaml"
SEQ = 32
VOCAB = 512
TOL = 1e-4
K_CHECKS = [None, 1, 3, [3, 1]]  # None: the default (k_train = 2), then two other k' and a per-layer list
MAX_DIFFS = {}  # name -> max |logit difference|, printed at the end of the module (pytest -s)


# ------------------------------------------------------------------------------ shared helpers
def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(11))


def _perturb_norms(model) -> None:
    """Norm weights away from 1, keyed by name so every rank and layout gets the same values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))


def _megatron_logits(model, k) -> torch.Tensor:
    from megatron_elastic.moe.control import set_inference_k

    model.eval()
    set_inference_k(model, k)
    tokens = _tokens()
    pos = torch.arange(SEQ).unsqueeze(0).expand(tokens.shape[0], -1)
    with torch.no_grad():
        return model(tokens, pos, None).float().clone()


def _cfg(data, run_dir, **extra):
    from megatron_elastic.config import load_config

    base = {"model.init_method_std": 0.2}
    base.update(extra)
    return load_config(SMOKE, tiny_overrides(data, Path(run_dir), **base))


def _hf_logits(model, k) -> torch.Tensor:
    from megatron_elastic.convert.hf_elastic import set_hf_inference_k

    set_hf_inference_k(model, k)
    with torch.no_grad():
        return model(input_ids=_tokens()).logits.float()


def _record(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    diff = float((a - b).abs().max())
    MAX_DIFFS[name] = diff
    return diff


def _read_safetensors(directory: Path) -> dict:
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    out = {}
    for name in files:
        with safe_open(str(directory / name), "pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_convert_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * noise if "norm" in name else 0.15 * noise)


def _hf_mixtral(**extra):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                  max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    config.update(extra)
    model = MixtralForCausalLM(MixtralConfig(**config))
    _randomize(model, 5)
    return model.eval()


def _hf_qwen3(**extra):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    # head_dim 16 != hidden/heads (8) and tied embeddings: both must survive the trip.
    config = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, tie_word_embeddings=True,
                  max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    config.update(extra)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**config))
    _randomize(model, 6)
    return model.eval()


# ------------------------------------------------------------------------------ process workers
# Where tensor parallelism splits each weight (dim of the local tensor), as Megatron's column-
# (qkv, fc1, embedding, output) and row-parallel (proj, fc2) layers do.
_TP_SPLIT_DIMS = {"linear_qkv.weight": 0, "linear_proj.weight": 1, "word_embeddings.weight": 0,
                  "output_layer.weight": 0, "linear_fc1.weight": 0, "linear_fc2.weight": 1}


def _save_tensor_parallel_layout(model, cfg, root: Path, iteration: int) -> None:
    """Save ``model`` exactly as TP=2 / expert-TP=2 ranks would: every tensor-parallel weight as
    two chunks at the global offsets Megatron's parallel layers use, fc1 as [gate0, gate1, up0,
    up1] like its SwiGLU sharded factory.

    Megatron on CPU cannot build a TP>1 MoE model (MoE under TP needs sequence parallelism, which
    the local spec's torch norms refuse), so the TP-sharded checkpoint is produced from the 1-rank
    model's own sharded state dict, split the way the TP ranks would have written it.
    """
    import dataclasses

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    state = model.sharded_state_dict()
    apply_factories(state)

    def split(x):
        if not isinstance(x, ShardedTensor):
            return x
        dim = next((d for suffix, d in _TP_SPLIT_DIMS.items() if x.key.endswith(suffix)), None)
        if dim is None:
            return x
        p = x.prepend_axis_num
        axis = p + dim
        offsets = [(a, x.global_offset[a], x.axis_fragmentations[a]) for a in range(p)]
        offsets += [(a, x.global_offset[a] // x.local_shape[a - p], x.axis_fragmentations[a])
                    for a in range(p, len(x.global_shape)) if a != axis and x.axis_fragmentations[a] > 1]
        chunk = x.global_offset[axis] // x.local_shape[dim]
        return [ShardedTensor.from_rank_offsets(x.key, part.contiguous(), *offsets,
                                                (axis, 2 * chunk + r, 2 * x.axis_fragmentations[axis]),
                                                replica_id=x.replica_id, prepend_axis_num=p)
                for r, part in enumerate(x.data.chunk(2, dim))]

    dict_list_map_inplace(split, state)
    parallel_cfg = dataclasses.replace(cfg.parallel, tensor_model_parallel_size=2, expert_tensor_parallel_size=2,
                                       sequence_parallel=True)
    tp_cfg = dataclasses.replace(cfg, parallel=parallel_cfg)
    directory = root / f"iter_{iteration:07d}"
    directory.mkdir(parents=True)
    dist_checkpointing.save({"model": state, "iteration": iteration, "config": tp_cfg.to_dict(),
                             "world_size": 2, "checkpoint_version": 1}, str(directory))
    (root / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")


def _single_process_work(rank, world_size, data, root):
    from megatron_elastic import parallel
    from megatron_elastic.config import load_config
    from megatron_elastic.convert.from_hf import convert_hf_to_megatron
    from megatron_elastic.models.gpt import build_model
    from megatron_elastic.training.checkpoint import load_checkpoint, save_checkpoint

    root = Path(root)
    out = {}
    cfg = _cfg(data, root)
    parallel.initialize(cfg)
    try:
        # 1-rank twin of the EP=2 model: build_model's weights do not depend on the layout.
        ref = build_model(cfg, VOCAB)
        _perturb_norms(ref)
        out["ep2_reference"] = {k: v.detach().clone() for k, v in ref.state_dict().items()
                                if isinstance(v, torch.Tensor)}
        for pre in (False, True):
            c = _cfg(data, root, **{"model.qk_layernorm": "true", "model.moe_router_pre_softmax": str(pre).lower()})
            m = build_model(c, VOCAB)
            _perturb_norms(m)
            save_checkpoint(root / f"qwen_pre{int(pre)}", m, None, c, 0)
            out[f"qwen_pre{int(pre)}"] = {json.dumps(k): _megatron_logits(m, k) for k in (None, 1, 3)}
        _save_tensor_parallel_layout(ref, cfg, root / "tp2", iteration=5)
        # Mixtral through the library (recipe for EP=2); Qwen3-MoE went through the CLI already.
        convert_hf_to_megatron(root / "hf_mixtral", root / "imported_mixtral", expert_model_parallel_size=2,
                               progress=False)
        for name in ("mixtral", "qwen3"):
            imported = root / f"imported_{name}"
            c = load_config(imported / "megatron_config.yaml", ["parallel.expert_model_parallel_size=1"])
            m = build_model(c, VOCAB)
            load_checkpoint(imported, m, None, c, finetune=True)
            out[f"imported_{name}"] = {json.dumps(k): _megatron_logits(m, k) for k in (None, 1)}
        big = _cfg(data, root, **{"model.num_layers": 12, "model.hidden_size": 128,
                                  "model.num_moe_experts": 8, "model.moe_ffn_hidden_size": 384})
        m = build_model(big, VOCAB)
        save_checkpoint(root / "big", m, None, big, 3)
        out["big_bytes"] = sum(p.numel() * p.element_size() for p in m.parameters())
    finally:
        parallel.destroy()
    return out


def _ep2_work(rank, world_size, data, root):
    from megatron_elastic import parallel
    from megatron_elastic.config import load_config
    from megatron_elastic.models.gpt import build_model
    from megatron_elastic.train import run
    from megatron_elastic.training.checkpoint import load_checkpoint, save_checkpoint

    root = Path(root)
    out = {}
    cfg = _cfg(data, root, **{"parallel.expert_model_parallel_size": 2})
    parallel.initialize(cfg)
    try:
        m = build_model(cfg, VOCAB)
        _perturb_norms(m)
        out["local_experts"] = len(m.decoder.layers[0].mlp.experts.local_experts)
        save_checkpoint(root / "ep2", m, None, cfg, 0)
        out["ep2"] = {json.dumps(k): _megatron_logits(m, k) for k in K_CHECKS}
        # An elastic recipe continues from the imported Mixtral (recipe emitted with EP=2).
        recipe = load_config(root / "imported_mixtral" / "megatron_config.yaml", [
            f"data.data_path=[{data['prefix']}]", "data.split=90,10,0",
            f"checkpoint.save={root / 'trained'}", "checkpoint.save_interval=2",
            "train.train_iters=2", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.eval_interval=0", "train.eval_iters=1", "train.lr_warmup_iters=0", "train.lr=1e-2",
            "model.seq_length=32", "logging.tensorboard_dir=null", "logging.log_interval=1",
            "elastic.schedule=layerwise", "elastic.k_min=1", "elastic.k_max=3",
            "elastic.eval_k=[3,1]", "elastic.router_loss_coeff=1e-3",
        ])
        result = run(recipe)
        out["train_losses"], out["train_iteration"] = result.losses, result.iteration
        trained = build_model(recipe, VOCAB)
        load_checkpoint(root / "trained", trained, None, recipe, finetune=True)
        out["trained"] = _megatron_logits(trained, [3, 1])  # the recipe's eval_k
    finally:
        parallel.destroy()
    return out


@pytest.fixture(scope="module")
def conv(smoke_data, tmp_path_factory):
    from megatron_elastic.convert.hf_tokenizer import save_hf_tokenizer

    root = tmp_path_factory.mktemp("hf_conversion")
    hf_logits = {}
    for name, model in (("mixtral", _hf_mixtral()), ("qwen3", _hf_qwen3())):
        directory = root / f"hf_{name}"
        model.save_pretrained(str(directory))
        save_hf_tokenizer(smoke_data["tokenizer"], directory)
        hf_logits[name] = {json.dumps(k): _hf_logits(model, k) for k in (None, 1)}
    # The import CLI (one real command line, with its progress bar); Mixtral goes through the library.
    proc = run_tool("tools/convert_from_hf.py", "--hf-dir", str(root / "hf_qwen3"), "--output",
                    str(root / "imported_qwen3"), "--config-out", str(root / "qwen3_recipe.yaml"))
    assert "imported qwen3_moe" in proc.stdout and "HF -> Megatron" in proc.stderr
    single = run_distributed(_single_process_work, 1, smoke_data, str(root), tmp_dir=root)[0]
    ep2 = run_distributed(_ep2_work, 2, smoke_data, str(root), tmp_dir=root)
    return {"root": root, "data": smoke_data, "hf": hf_logits, "single": single, "ep2": ep2}


@pytest.fixture(scope="module", autouse=True)
def _report_diffs():
    yield
    if MAX_DIFFS:
        print("\nmax |logit difference| per check:")
        for name, diff in sorted(MAX_DIFFS.items()):
            print(f"  {name}: {diff:.3e}")


# ------------------------------------------------------------------------------ Megatron -> HF
@pytest.mark.slow
@pytest.mark.multiproc
def test_export_expert_parallel_checkpoint_keeps_every_expert_and_logits(conv, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_elastic.convert import TargetExistsError
    from megatron_elastic.convert.to_hf import (
        convert_megatron_to_hf, find_checkpoint_dir, megatron_state_dict_to_hf, read_checkpoint_config,
    )

    root, out = conv["root"], tmp_path / "hf"
    assert all(r["local_experts"] == 2 for r in conv["ep2"])  # really split over two EP ranks
    assert (root / "ep2" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    result = convert_megatron_to_hf(root / "ep2", out, progress=False)  # exported in this one process
    assert result.iteration == 0 and result.architecture == "mixtral"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and "auto_map" not in config
    assert config["num_experts_per_tok"] == 2 and config["vocab_size"] == VOCAB

    # Every expert of both EP ranks is there, and each equals the 1-rank reference bit for bit.
    tensors = _read_safetensors(out)
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
        diff = _record(f"ep2 mixtral export k={k}", _hf_logits(model, k), megatron[key])
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
    assert _read_safetensors(out)["lm_head.weight"].dtype == torch.bfloat16


@pytest.mark.slow
def test_export_tensor_parallel_sharded_checkpoint(conv, tmp_path):
    """A checkpoint whose weights are split over TP=2 / expert-TP=2 ranks is gathered exactly."""
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_elastic.convert.to_hf import convert_megatron_to_hf, find_checkpoint_dir, megatron_state_dict_to_hf
    from megatron_elastic.convert.to_hf import read_checkpoint_config

    ckpt = find_checkpoint_dir(conv["root"] / "tp2")
    chunks = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert len(chunks["decoder.layers.self_attention.linear_qkv.weight"].chunks) == 2 * 2  # layers x TP
    assert len(chunks["decoder.layers.mlp.experts.experts.linear_fc1.weight"].chunks) == 2 * 4 * 4  # x gate/up x ETP
    cfg, iteration, _ = read_checkpoint_config(ckpt)
    assert iteration == 5 and cfg.parallel.tensor_model_parallel_size == 2
    out = tmp_path / "hf"
    convert_megatron_to_hf(conv["root"] / "tp2", out, progress=False)
    tensors = _read_safetensors(out)
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
        diff = _record(f"qwen3 export pre_softmax={pre_softmax} k={k}", _hf_logits(model, k), megatron[json.dumps(k)])
        assert diff < TOL, (k, diff)
    # The exported flag is what makes them equal: flipped, the same weights give other logits.
    for router in moe_routers(model):
        router.norm_topk_prob = not router.norm_topk_prob
    assert (_hf_logits(model, 3) - megatron[json.dumps(3)]).abs().max() > 100 * TOL


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
    assert (meta["schedule"], meta["k_min"], meta["k_max"], meta["k_train"]) == ("layerwise", 1, 3, 2)
    assert meta["inference_k"] == [3, 1] and meta["iteration"] == 2 and meta["router_loss_coeff"] == 1e-3
    assert config["num_experts_per_tok"] == 3  # a varying schedule evaluates at k_max by default
    plain = AutoModelForCausalLM.from_pretrained(str(out))
    assert get_hf_inference_k(plain) == [3, 3]
    model = load_elastic_hf(str(out))  # applies the per-layer k recorded at export
    assert get_hf_inference_k(model) == [3, 1]
    with torch.no_grad():
        logits = model(input_ids=_tokens()).logits.float()
    diff = _record("iteration-2 export, per-layer k [3, 1]", logits, conv["ep2"][0]["trained"])
    assert diff < TOL
    # Training continued from the imported weights: two Adam steps at lr 1e-2 moved every tensor
    # by at most ~2e-2 (a fresh initialisation would differ by the weights' own scale, ~0.15).
    imported, exported = _read_safetensors(conv["root"] / "hf_mixtral"), _read_safetensors(out)
    moves = {name: float((exported[name] - imported[name]).abs().max()) for name in imported}
    assert max(moves.values()) < 0.05 and moves["model.embed_tokens.weight"] > 0


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
    original, back = _read_safetensors(root / f"hf_{name}"), _read_safetensors(out)
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
        diff = _record(f"import {name} k={k}", conv["single"][f"imported_{name}"][key], conv["hf"][name][key])
        assert diff < TOL, (k, diff)


@pytest.mark.slow
@pytest.mark.multiproc
def test_elastic_recipe_trains_from_imported_checkpoint(conv):
    first, second = conv["ep2"]
    assert first["train_iteration"] == 2 and len(first["train_losses"]) == 2
    assert first["train_losses"] == second["train_losses"]
    assert all(math.isfinite(loss) for loss in first["train_losses"])
    assert first["train_losses"][0] != first["train_losses"][1]


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
    from megatron_elastic.convert.to_hf import convert_megatron_to_hf, find_checkpoint_dir, read_checkpoint_config

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
    tool = _load_tool("convert_to_hf")
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


def test_export_architecture_choice_and_refusals():
    from megatron_elastic.config import Config
    from megatron_elastic.convert import ConversionError, UnknownArchitectureError
    from megatron_elastic.convert.to_hf import choose_architecture

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


# ------------------------------------------------------------------------------ errors (import)
def _resave(directory: Path, edit) -> None:
    """Rewrite a one-file HF checkpoint with ``edit(tensors)`` applied."""
    from safetensors.torch import save_file

    tensors = _read_safetensors(directory)
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_import_errors(tmp_path):
    from megatron_elastic.convert import (
        ConversionError, MissingTensorError, ShapeMismatchError, TargetExistsError, UnknownArchitectureError,
    )
    from megatron_elastic.convert.from_hf import convert_hf_to_megatron

    base = tmp_path / "mixtral"
    _hf_mixtral().save_pretrained(str(base))

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
    tool = _load_tool("convert_from_hf")
    assert tool.main(["--hf-dir", str(tmp_path / "llama"), "--output", str(tmp_path / "o8")]) == 2


# ------------------------------------------------------------------------------ mapping details
def _shape(**kw):
    from megatron_elastic.convert.mapping import ModelShape

    base = dict(architecture="mixtral", num_layers=2, hidden_size=16, num_heads=4, num_query_groups=2,
                head_dim=4, num_experts=3, ffn_hidden_size=8, vocab_size=64, qk_layernorm=False,
                tied_embeddings=False)
    base.update(kw)
    return ModelShape(**base)


def test_qkv_split_follows_query_groups():
    from megatron_elastic.convert.mapping import merge_qkv, split_qkv

    shape = _shape()
    # Row r of Megatron's QKV is tagged with its (group, slot, row-in-head): slots 0..1 are the
    # group's query heads, 2 its key head, 3 its value head.
    tags = torch.tensor([[g * 100 + s * 10 + d] * 16 for g in range(2) for s in range(4) for d in range(4)],
                        dtype=torch.float32)
    q, k, v = split_qkv(tags, shape)
    assert q[:, 0].tolist() == [g * 100 + s * 10 + d for g in range(2) for s in range(2) for d in range(4)]
    assert k[:, 0].tolist() == [g * 100 + 20 + d for g in range(2) for d in range(4)]
    assert v[:, 0].tolist() == [g * 100 + 30 + d for g in range(2) for d in range(4)]
    assert torch.equal(merge_qkv(q, k, v, shape), tags)


def _sequential_state_dict(shape, seed=0):
    from megatron_elastic.convert.mapping import megatron_param_shapes

    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(s, generator=g) for name, s in megatron_param_shapes(shape).items()}


def test_grouped_sequential_and_checkpoint_expert_layouts_agree():
    """Expert weights stored sequentially, grouped, stacked (dist checkpoint) or as singleton
    shards with separate gate/up keys all export to the same tensors."""
    from megatron_elastic.config import Config
    from megatron_elastic.convert.to_hf import megatron_state_dict_to_hf

    shape = _shape()
    cfg = Config.from_dict({"model": {"num_layers": 2, "hidden_size": 16, "num_attention_heads": 4,
                                      "num_query_groups": 2, "num_moe_experts": 3, "moe_ffn_hidden_size": 8,
                                      "moe_router_topk": 2}}).validate()
    seq = _sequential_state_dict(shape)
    expected = megatron_state_dict_to_hf(seq, cfg)
    assert len([n for n in expected if n.endswith(".w1.weight")]) == 2 * 3

    grouped = {re.sub(r"local_experts\.(\d+)\.(linear_fc\d\.weight)", r"\2\1", k): v for k, v in seq.items()}
    assert any(re.search(r"linear_fc1\.weight2$", k) for k in grouped)

    stacked = {k: v for k, v in seq.items() if not k.startswith("decoder.layers.")}
    per_layer = [{k.split(f"decoder.layers.{i}.", 1)[1]: v for k, v in seq.items()
                  if k.startswith(f"decoder.layers.{i}.")} for i in range(2)]
    te_names = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    for suffix in per_layer[0]:
        if ".local_experts." in suffix:
            continue
        stacked[f"decoder.layers.{te_names.get(suffix, suffix)}"] = torch.stack([p[suffix] for p in per_layer])
    for fc in (1, 2):
        stacked[f"decoder.layers.mlp.experts.experts.linear_fc{fc}.weight"] = torch.stack([
            torch.stack([p[f"mlp.experts.local_experts.{j}.linear_fc{fc}.weight"] for j in range(3)])
            for p in per_layer])

    singleton = {}
    for k, v in seq.items():
        m = re.match(r"decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.linear_fc(\d)\.weight", k)
        if m and m[3] == "1":
            prefix = f"decoder.layers.{m[1]}.mlp.experts.experts.{m[2]}.linear_fc1.weight"
            singleton[prefix + "_w"], singleton[prefix + "_v"] = v.chunk(2)
        elif m:
            singleton[f"decoder.layers.{m[1]}.mlp.experts.experts.{m[2]}.linear_fc2.weight"] = v
        else:
            singleton[k] = v
    for layout in (grouped, stacked, singleton):
        got = megatron_state_dict_to_hf(layout, cfg)
        assert set(got) == set(expected)
        assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_checkpoint_with_fewer_experts_is_rejected_not_truncated():
    """A stored expert axis shorter than the config's expert count (experts of other EP ranks
    missing) is an error naming the key, never a silently smaller model."""
    from megatron_elastic.convert import ShapeMismatchError
    from megatron_elastic.convert.mapping import megatron_layer_tensors, resolve

    shape = _shape()
    down = next(t for t in megatron_layer_tensors(shape, 1) if t.expert == 2 and t.fc == 2)
    stored = {"decoder.layers.mlp.experts.experts.linear_fc2.weight": (2, 2, 16, 8)}
    with pytest.raises(ShapeMismatchError, match=r"linear_fc2\.weight.*holds 2 experts.*num_moe_experts=3"):
        resolve(down, shape, stored, "checkpoint")
    stored = {"decoder.layers.mlp.experts.experts.linear_fc2.weight": (2, 3, 16, 8)}
    ref = resolve(down, shape, stored, "checkpoint")
    assert (ref.key, ref.index) == ("decoder.layers.mlp.experts.experts.linear_fc2.weight", (1, 2))


def test_hf_inference_k_helper():
    from megatron_elastic.convert.hf_elastic import get_hf_inference_k, inference_k_from_config, set_hf_inference_k

    model = _hf_mixtral()
    assert get_hf_inference_k(model) == [2, 2]
    assert set_hf_inference_k(model, [1, 4]) == [1, 4]
    assert [layer.mlp.gate.top_k for layer in model.model.layers] == [1, 4]
    assert inference_k_from_config(model.config) == [1, 4]  # kept by save_pretrained
    with torch.no_grad():
        k14 = model(input_ids=_tokens()).logits
    set_hf_inference_k(model, 3)
    assert get_hf_inference_k(model) == [3, 3] and model.config.num_experts_per_tok == 3
    with torch.no_grad():
        assert (model(input_ids=_tokens()).logits - k14).abs().max() > 1e-3
    with pytest.raises(ValueError, match="2 MoE layers"):
        set_hf_inference_k(model, [1, 2, 3])
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        set_hf_inference_k(model, 5)


def test_exported_tokenizer_is_lossless_and_matches_training_ids(smoke_data, tmp_path):
    from transformers import AutoTokenizer

    from megatron_elastic.convert.hf_tokenizer import save_hf_tokenizer
    from megatron_elastic.data.tokenizer import SentencePieceTokenizer

    special = save_hf_tokenizer(smoke_data["tokenizer"], tmp_path)
    assert (special["bos"], special["eos"], special["pad"]) == (1, 2, 3)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    ours = SentencePieceTokenizer(smoke_data["tokenizer"])
    texts = [p.read_text() for p in sorted((REPO / "megatron_elastic").rglob("*.py"))[:12]]
    texts += [
        "def f(x):\n\tif x:\n        return 1234567890  \n\n\n  r\u00e9sum\u00e9 \u4e16\u754c \U0001f642\r\n x\x00 \t end",
        "  leading and trailing whitespace   ", "<s>html strike</s> and <pad> are just text",
    ]
    for text in texts:
        if "\u2581" in text:
            continue  # the one documented exception (docs/hf_conversion.md)
        ids = hf.encode(text)
        assert hf.decode(ids) == text
        assert ids == ours.encode(text)  # the ids the model was trained on; no BOS added
    assert hf.decode(hf.encode("a\u2581b")) == "a b"  # sentencepiece's space marker, as documented
