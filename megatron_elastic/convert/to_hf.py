"""Megatron-core distributed checkpoint -> Hugging Face Mixtral / Qwen3-MoE / Qwen2-MoE / OLMoE
directory (multi-latent-attention checkpoints are handed to ``deepseek_v3_io``).

The export, one group of tensors at a time: ``megatron_checkpoint`` locates and verifies the
checkpoint, recovers its run config and reads each group's slices (DCP, no process group);
``hf_config`` chooses the architecture and builds config.json; ``mapping`` turns Megatron tensors
into hub tensors; ``hf_writer`` streams them into safetensors shards and commits the directory
atomically. Every tensor the architecture needs is resolved before anything is written.

Memory bound: at any moment the process holds the tensors of one group (the embedding, one
transformer layer with all its experts, or the final norm + output layer) plus the tensors queued
for the safetensors shard being filled (at most ``max_shard_size``, or one tensor when a single
tensor is larger). ``ExportResult`` reports both, and ``tests/convert/test_export.py`` checks the
process's peak RSS against them on a model spanning several shards.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from megatron_elastic.config import Config
from megatron_elastic.convert import ConversionError
from megatron_elastic.convert import mapping
from megatron_elastic.convert.hf_config import choose_architecture, hf_config, model_shape
from megatron_elastic.convert.hf_writer import ShardWriter, commit_output, parse_size, prepare_output
from megatron_elastic.convert.mapping import Ref
from megatron_elastic.convert.megatron_checkpoint import (
    DistCheckpointSource,
    StateDictSource,
    find_checkpoint_dir,
    plan_reads,
    read_checkpoint_config,
)

# Importable from here as before the split (tests, callers of the library API).
__all__ = [
    "DTYPES", "ExportResult", "export", "preload", "warm_up", "convert_megatron_to_hf",
    "megatron_state_dict_to_hf", "find_checkpoint_dir", "read_checkpoint_config", "choose_architecture",
    "model_shape", "hf_config", "DistCheckpointSource", "StateDictSource", "plan_reads", "ShardWriter",
    "parse_size", "prepare_output", "commit_output",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------ the export
@dataclass
class ExportResult:
    output: Path
    architecture: str
    iteration: Optional[int]
    checkpoint_dir: Optional[Path]
    num_tensors: int = 0
    shards: List[str] = field(default_factory=list)
    total_bytes: int = 0
    experts_per_layer: List[int] = field(default_factory=list)
    # Memory accounting (bytes): the largest group of source tensors held at once, the largest
    # shard buffer, and the largest sum of the two at any moment.
    max_group_bytes: int = 0
    max_shard_bytes: int = 0
    peak_tracked_bytes: int = 0
    seconds: float = 0.0


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _resolve_dtype(dtype, source, first_key: str) -> torch.dtype:
    if dtype in (None, "auto"):
        return source.dtypes[first_key]
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _tokenizer_path(cfg: Config, tokenizer_model) -> Optional[Path]:
    if tokenizer_model is False:
        return None
    if tokenizer_model is not None:
        path = Path(tokenizer_model)
        if not path.exists():
            raise ConversionError(f"tokenizer model {path} does not exist")
        return path
    configured = cfg.data.tokenizer_model
    # A sentencepiece .model file or a Hugging Face tokenizer directory.
    if configured and Path(configured).exists():
        return Path(configured)
    raise ConversionError(
        f"the checkpoint's tokenizer (data.tokenizer_model={configured!r}) is not available here: "
        "pass --tokenizer-model path/to/spm.model (or a Hugging Face tokenizer directory), or "
        "--no-tokenizer to export the weights alone"
    )


def export_tokenizer(cfg: Config, tokenizer_model, vocab: int, emb: str) -> Tuple[Optional[Path], Optional[dict]]:
    """The tokenizer an export ships (``--tokenizer-model``, else the recipe's) and its special
    token ids; one with more pieces than the embedding ``emb`` has rows is refused."""
    tok_path = _tokenizer_path(cfg, tokenizer_model)
    if tok_path is None:
        return None, None
    from megatron_elastic.convert.hf_tokenizer import special_token_ids

    special = special_token_ids(tok_path)
    if special["vocab_size"] > vocab:
        raise mapping.ShapeMismatchError(
            f"tokenizer {tok_path} has {special['vocab_size']} pieces but the embedding "
            f"'{emb}' has only {vocab} rows: the tokenizer does not belong to this model"
        )
    return tok_path, special


def finish_export(tmp: Path, output: Path, config, cfg: Config, tok_path: Optional[Path]) -> None:
    """Every export's tail, once its weight shards are in ``tmp``: the model config, a generation
    config with its special tokens, the tokenizer (when there is one), then the atomic move of
    ``tmp`` to ``output``."""
    from transformers import GenerationConfig

    config.save_pretrained(str(tmp))
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(str(tmp))
    if tok_path is not None:
        from megatron_elastic.convert.hf_tokenizer import save_hf_tokenizer

        save_hf_tokenizer(tok_path, tmp, model_max_length=cfg.model.max_position_embeddings or cfg.model.seq_length)
    commit_output(tmp, output)


def export(
    source,
    cfg: Config,
    output: Union[str, os.PathLike],
    *,
    iteration: Optional[int] = None,
    architecture: Optional[str] = None,
    dtype=None,
    max_shard_size: Union[int, str] = "5GB",
    tokenizer_model=None,
    overwrite: bool = False,
    progress: bool = True,
    protect: Tuple[Path, ...] = (),
) -> ExportResult:
    """Write a Hugging Face directory from any tensor source (checkpoint or state dict)."""
    from tqdm import tqdm

    start = time.time()
    arch = choose_architecture(cfg, architecture)
    emb = "embedding.word_embeddings.weight"
    if emb not in source.shapes:
        stacked = [k for k in source.shapes if k.startswith("decoder.")]
        raise mapping.MissingTensorError(
            f"{source.description} has no '{emb}'"
            + ("" if stacked else " (and no decoder tensors: is this a model checkpoint?)")
        )
    vocab = source.shapes[emb][0]
    shape = model_shape(cfg, vocab, arch)
    out_dtype = _resolve_dtype(dtype, source, emb)
    max_shard = parse_size(max_shard_size)
    tok_path, special = export_tokenizer(cfg, tokenizer_model, vocab, emb)
    plan = plan_reads(source, shape)  # every tensor resolved (or a clear error) before writing
    output = Path(output)
    tmp = prepare_output(output, overwrite, protect)
    result = ExportResult(output=output, architecture=arch, iteration=iteration,
                          checkpoint_dir=getattr(source, "dir", None))
    try:
        writer = ShardWriter(tmp, max_shard)
        bar = tqdm(plan, desc="Megatron -> HF", unit="group", disable=not progress, dynamic_ncols=True)
        for label, refs in bar:
            bar.set_postfix_str(label)
            loaded = source.load(refs)
            group_bytes = _nbytes(loaded.values())
            result.max_group_bytes = max(result.max_group_bytes, group_bytes)
            if label.startswith("layer"):
                experts = {n.split(".local_experts.")[1].split(".")[0] for n in loaded if ".local_experts." in n}
                result.experts_per_layer.append(len(experts))
            for name, tensor in mapping.megatron_to_hf_tensors(loaded, shape):
                writer.add(name, tensor.to(out_dtype))
                result.num_tensors += 1
                # Upper bound: the group's source tensors are all counted as held until the group
                # ends, plus whatever the shard buffer holds (some of it may be the same memory).
                result.peak_tracked_bytes = max(result.peak_tracked_bytes, group_bytes + writer.buffer_bytes)
                result.max_shard_bytes = max(result.max_shard_bytes, writer.buffer_bytes)
            del loaded
        bar.close()
        result.shards = writer.finish()
        result.total_bytes = writer.total_bytes
        finish_export(tmp, output, hf_config(cfg, shape, out_dtype, special, iteration), cfg, tok_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.seconds = time.time() - start
    return result


def preload() -> None:
    """Import every library the export uses (for memory measurements that exclude imports)."""
    for name in ("safetensors.torch", "tokenizers", "torch.distributed.checkpoint", "transformers",
                 "megatron.core.dist_checkpointing", "megatron_elastic.convert.hf_tokenizer",
                 "megatron_elastic.training.checkpoint"):
        importlib.import_module(name)
    transformers = importlib.import_module("transformers")
    for name in ("GenerationConfig", "MixtralConfig", "PreTrainedTokenizerFast", "Qwen3MoeConfig",
                 "Qwen2MoeConfig", "OlmoeConfig"):
        getattr(transformers, name)  # transformers imports its classes lazily, on first access


def warm_up(load: Union[str, os.PathLike]) -> None:
    """Run the export's read and write paths once on the smallest stored tensor.

    For memory measurements: the first use of a library function pages its code in, which shows
    up in the resident set although it is not conversion data. Errors are left to the real run.
    """
    import tempfile

    try:
        ckpt = find_checkpoint_dir(load)
        read_checkpoint_config(ckpt)
        source = DistCheckpointSource(ckpt)
    except ConversionError:
        return
    if not source.shapes:
        return
    key = min(source.shapes, key=lambda k: math.prod(source.shapes[k]))
    shape = source.shapes[key]
    tensor = source.load({"x": Ref(key, (), 0, shape, shape)})["x"]
    with tempfile.TemporaryDirectory() as tmp:
        writer = ShardWriter(Path(tmp), 1 << 20)
        writer.add("x", tensor.float())
        writer.finish()


def convert_megatron_to_hf(
    load: Union[str, os.PathLike],
    output: Union[str, os.PathLike],
    *,
    architecture: Optional[str] = None,
    dtype=None,
    max_shard_size: Union[int, str] = "5GB",
    tokenizer_model=None,
    config: Union[None, str, os.PathLike, Config] = None,
    overwrite: bool = False,
    progress: bool = True,
    fallback_to_last_good: bool = False,
    inference_k: Optional[List[int]] = None,
) -> ExportResult:
    """Export the checkpoint at ``load`` (run root or ``iter_N`` dir) to ``output``.

    ``architecture``: None/'auto' (DeepSeek-V3 with multi-latent attention, OLMoE with
    projection-wide QK-norm, Qwen2-MoE with a shared expert, Qwen3-MoE with per-head QK-norm, else
    Mixtral) or one of those by name. ``dtype``: None/'auto' keeps the stored dtype. ``tokenizer_model``: None uses the
    checkpoint config's tokenizer (sentencepiece model or Hugging Face directory), a path
    overrides it, False skips the tokenizer.
    ``config``: describes a checkpoint that does not record its own. ``fallback_to_last_good``:
    a checkpoint that fails its manifest check exports the newest complete earlier one instead.
    ``inference_k``: a per-layer budget (one k per MoE layer, e.g. from tools/search_budget.py)
    recorded as ``elastic_moe.inference_k``, which ``load_elastic_hf`` applies on load.
    """
    ckpt_dir = find_checkpoint_dir(load, fallback_to_last_good)
    cfg, iteration, _ = read_checkpoint_config(ckpt_dir, config)
    if inference_k is not None:
        m = cfg.model
        ks = [int(k) for k in inference_k]
        moe_layers = m.moe_layers
        if len(ks) != len(moe_layers) or not all(1 <= k <= m.num_moe_experts for k in ks):
            raise ConversionError(
                f"--inference-k {','.join(map(str, ks))}: give one k per MoE layer ({len(moe_layers)}: "
                f"layers {moe_layers} in depth order; dense layers have none), each in "
                f"[1, num_moe_experts={m.num_moe_experts}]")
        cfg.elastic.eval_k = ks
    if cfg.model.multi_latent_attention:  # DeepSeek-V3: its own module (convert/deepseek_v3_io.py)
        if architecture not in (None, "auto", "deepseek_v3", "deepseek_v2"):
            raise ConversionError(f"the model has multi-latent attention: it exports as deepseek_v3 (sigmoid router) "
                                  f"or deepseek_v2 (pre-softmax router), not {architecture}")
        from megatron_elastic.convert.deepseek_v3_io import export_deepseek_v3

        return export_deepseek_v3(ckpt_dir, cfg, iteration, output, architecture=architecture, dtype=dtype,
                                  max_shard_size=max_shard_size,
                                  tokenizer_model=tokenizer_model, overwrite=overwrite, progress=progress)
    source = DistCheckpointSource(ckpt_dir)
    return export(source, cfg, output, iteration=iteration, architecture=architecture, dtype=dtype,
                  max_shard_size=max_shard_size, tokenizer_model=tokenizer_model, overwrite=overwrite,
                  progress=progress, protect=(ckpt_dir,))


def megatron_state_dict_to_hf(
    state_dict: Dict[str, torch.Tensor], cfg: Config, architecture: Optional[str] = None
) -> Dict[str, torch.Tensor]:
    """In-memory variant: hub-format tensors from a Megatron ``state_dict()`` with every expert
    (SequentialMLP ``local_experts.<j>.`` or grouped ``linear_fc1.weight<j>`` names)."""
    source = StateDictSource(state_dict)
    arch = choose_architecture(cfg, architecture)
    emb = "embedding.word_embeddings.weight"
    if emb not in source.shapes:
        raise mapping.MissingTensorError(f"state dict has no '{emb}'")
    shape = model_shape(cfg, source.shapes[emb][0], arch)
    out: Dict[str, torch.Tensor] = {}
    for _, refs in plan_reads(source, shape):
        out.update(mapping.megatron_to_hf_tensors(source.load(refs), shape))
    return out
