"""Megatron-core distributed checkpoint -> Hugging Face Mixtral / Qwen3-MoE directory.

How the checkpoint is read: a Megatron-core ``torch_dist`` checkpoint is a PyTorch Distributed
Checkpoint (DCP) whose tensors are stored under *global* keys and shapes, independent of the
tensor/expert-parallel layout that wrote them (EP ranks each save their own experts at their
global offsets of one ``[layers, experts, ...]`` tensor). The exporter reads the DCP metadata,
resolves every tensor the architecture needs (``mapping.resolve``: missing tensors and shape
mismatches fail here, before anything is written), then asks DCP for exactly one layer's
slices at a time (``_SlicePlanner``), so no process group, no model and no full state dict is
ever built. Megatron's own ``dist_checkpointing.load`` cannot do this in one process: it insists
that the requested shards cover each tensor whole.

Memory bound: at any moment the process holds the tensors of one group (the embedding, one
transformer layer with all its experts, or the final norm + output layer) plus the tensors queued
for the safetensors shard being filled (at most ``max_shard_size``, or one tensor when a single
tensor is larger). ``ExportResult`` reports both, and ``tests/test_convert_hf.py`` checks the
process's peak RSS against them on a model spanning several shards.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from megatron_elastic.config import Config, ConfigError
from megatron_elastic.convert import (
    ConversionError,
    IncompleteCheckpointError,
    TargetExistsError,
    UnknownArchitectureError,
)
from megatron_elastic.convert import mapping
from megatron_elastic.convert.mapping import ModelShape, Ref

ELASTIC_FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- locating the save
def find_checkpoint_dir(path: Union[str, os.PathLike]) -> Path:
    """The iteration directory to export from a run root (via the tracker) or an ``iter_N`` dir.

    Iteration 0 is a valid checkpoint like any other (the tracker holds "0"): nothing here treats
    a falsy iteration as "no checkpoint".
    """
    from megatron_elastic.training.checkpoint import CheckpointError, resolve_load_dir

    path = Path(path)
    if not path.exists():
        raise ConversionError(f"checkpoint path {path} does not exist")
    if path.name.endswith(".partial") or path.name.endswith(".old"):
        raise IncompleteCheckpointError(
            f"{path} is an interrupted save ({path.suffix} directory), not a complete checkpoint; "
            "point --load at the run's checkpoint root or a complete iter_N directory"
        )
    if _looks_like_iteration_dir(path):
        _check_complete(path)
        return path
    try:
        found = resolve_load_dir(path)
    except CheckpointError as exc:
        raise IncompleteCheckpointError(str(exc)) from exc
    if found is None:
        complete = sorted(p.name for p in path.glob("iter_*") if p.is_dir() and _looks_like_iteration_dir(p)
                          and not p.name.endswith((".partial", ".old")))
        hint = (f"; it has iteration directories ({', '.join(complete)}): pass one of them directly"
                if complete else "")
        raise IncompleteCheckpointError(
            f"{path} holds no complete checkpoint (no latest_checkpointed_iteration.txt{hint})"
        )
    _check_complete(found)
    return found


def _looks_like_iteration_dir(path: Path) -> bool:
    return any((path / name).exists() for name in ("metadata.json", ".metadata", "common.pt"))


def _check_complete(path: Path) -> None:
    """A finished ``dist_checkpointing.save`` leaves metadata.json, common.pt and DCP's .metadata.

    DCP writes ``.metadata`` last, after every rank's data files, so its absence means the save
    was interrupted.
    """
    missing = [name for name in ("metadata.json", "common.pt", ".metadata") if not (path / name).is_file()]
    if missing:
        raise IncompleteCheckpointError(
            f"{path} is not a complete save (missing {', '.join(missing)}): the save was interrupted "
            "or the directory was copied partially; use an earlier complete checkpoint"
        )
    meta = json.loads((path / "metadata.json").read_text())
    backend = meta.get("sharded_backend")
    if backend != "torch_dist":
        raise ConversionError(
            f"{path} uses the '{backend}' sharded backend; only 'torch_dist' (Megatron-core's default) "
            "is supported: re-save it with a current Megatron-core"
        )


def read_checkpoint_config(ckpt_dir: Path, override: Union[None, str, os.PathLike, Config] = None
                           ) -> Tuple[Config, Optional[int], str]:
    """(config, iteration, where the config came from).

    Order: an explicit ``override``; the ``config`` entry of the common state (what
    ``save_checkpoint`` writes); the ``run_config.yaml`` next to it. A checkpoint that lacks both
    (saved by another tool) is not rejected outright: the caller can pass a config describing it.
    A missing iteration is reported as None rather than treated as an error.
    """
    from megatron.core import dist_checkpointing

    from megatron_elastic.config import load_config

    common = dist_checkpointing.load_common_state_dict(str(ckpt_dir))
    iteration = common.get("iteration")
    iteration = int(iteration) if iteration is not None else None
    if isinstance(override, Config):
        return override, iteration, "the given config"
    if override is not None:
        return load_config(override), iteration, str(override)
    raw = common.get("config")
    if isinstance(raw, dict):
        return _config_from_saved_dict(raw, f"{ckpt_dir}/common.pt"), iteration, "the checkpoint"
    yaml_path = ckpt_dir / "run_config.yaml"
    if yaml_path.is_file():
        import yaml

        return _config_from_saved_dict(yaml.safe_load(yaml_path.read_text()), str(yaml_path)), iteration, str(yaml_path)
    raise ConversionError(
        f"{ckpt_dir} records no model configuration (no 'config' in common.pt, no run_config.yaml); "
        "pass the recipe it was trained with (--config path/to/recipe.yaml)"
    )


def _config_from_saved_dict(raw: dict, source: str) -> Config:
    """Config.from_dict, tolerating keys this version does not know (older/newer checkpoints)."""
    import dataclasses

    from megatron_elastic.config import SECTIONS

    try:
        return Config.from_dict(raw, source=source).validate()
    except ConfigError:
        pass
    cleaned = {}
    for section, cls in SECTIONS.items():
        known = {f.name for f in dataclasses.fields(cls)}
        cleaned[section] = {k: v for k, v in (raw.get(section) or {}).items() if k in known}
    try:
        return Config.from_dict(cleaned, source=source).validate()
    except ConfigError as exc:
        raise ConversionError(f"{source}: the saved config is not usable ({exc}); pass --config") from exc


# ------------------------------------------------------------------------------ architecture
def choose_architecture(cfg: Config, requested: Optional[str] = None) -> str:
    """Mixtral without QK-norm, Qwen3-MoE with it; refuse what neither can express exactly."""
    m = cfg.model
    if requested in (None, "auto"):
        arch = "qwen3_moe" if m.qk_layernorm else "mixtral"
    elif requested in mapping.ARCHITECTURES:
        arch = requested
    elif requested in mapping.HF_CLASS_TO_ARCH:
        arch = mapping.HF_CLASS_TO_ARCH[requested]
    else:
        raise UnknownArchitectureError(
            f"unknown architecture {requested!r}; choose auto, {', '.join(mapping.ARCHITECTURES)}"
        )
    if m.normalization != "RMSNorm":
        raise ConversionError(f"model.normalization={m.normalization}: Mixtral and Qwen3-MoE use RMSNorm")
    if m.moe_router_score_function != "softmax":
        raise ConversionError(
            f"model.moe_router_score_function={m.moe_router_score_function}: Mixtral and Qwen3-MoE "
            "route with a softmax; a sigmoid router has no equivalent there"
        )
    if arch == "mixtral" and m.qk_layernorm:
        raise ConversionError(
            "the model has QK-norm (model.qk_layernorm=true) but Mixtral has none: export it as "
            "qwen3_moe (the default for QK-norm models)"
        )
    if arch == "qwen3_moe" and not m.qk_layernorm:
        raise ConversionError(
            "Qwen3-MoE always normalises queries and keys but this model has no QK-norm: export it "
            "as mixtral (the default for models without QK-norm)"
        )
    if arch == "mixtral" and m.moe_router_pre_softmax:
        raise ConversionError(
            "model.moe_router_pre_softmax=true: the gate weights are the raw softmax probabilities of "
            "the selected experts (their sum grows with k), but Mixtral always renormalises the "
            "top-k probabilities to sum to 1, so the exported model would compute something else. "
            "Only Qwen3-MoE (norm_topk_prob=false) expresses this router, and it needs QK-norm"
        )
    return arch


def model_shape(cfg: Config, vocab_size: int, arch: str) -> ModelShape:
    m = cfg.model
    return ModelShape(
        architecture=arch,
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads,
        num_experts=m.num_moe_experts,
        ffn_hidden_size=m.moe_ffn_hidden_size,
        vocab_size=vocab_size,
        qk_layernorm=m.qk_layernorm,
        tied_embeddings=not m.untie_embeddings_and_output_weights,
    )


def default_inference_k(cfg: Config) -> int:
    """The k Megatron evaluates with when nothing is set (moe/layer.py attach_elastic)."""
    e = cfg.elastic
    if isinstance(e.eval_k, int):
        return e.eval_k
    return cfg.model.moe_router_topk if e.schedule == "fixed" else cfg.elastic_k_max


def elastic_metadata(cfg: Config, iteration: Optional[int]) -> dict:
    """What config.json keeps under ``elastic_moe``: the training schedule and k range, and the
    per-layer inference k when the recipe set one (``hf_elastic.load_elastic_hf`` applies it)."""
    e = cfg.elastic
    return {
        "format_version": ELASTIC_FORMAT_VERSION,
        "k_train": cfg.model.moe_router_topk,
        "schedule": e.schedule,
        "k_min": cfg.elastic_k_min,
        "k_max": cfg.elastic_k_max,
        "distribution": e.distribution,
        "tau": e.tau,
        "top_p": e.top_p,
        "pool_ratio": e.pool_ratio,
        "router_loss_coeff": e.router_loss_coeff,
        "seed": cfg.elastic_seed,
        "inference_k": list(e.eval_k) if isinstance(e.eval_k, list) else None,
        "default_inference_k": default_inference_k(cfg),
        "moe_router_pre_softmax": cfg.model.moe_router_pre_softmax,
        "iteration": iteration,
    }


def hf_config(cfg: Config, shape: ModelShape, dtype: torch.dtype, special: Optional[dict],
              iteration: Optional[int]):
    """The transformers config object (written with save_pretrained, so its format is exact)."""
    m = cfg.model
    special = special or {}
    common = dict(
        vocab_size=shape.vocab_size,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups,
        head_dim=shape.head_dim,
        hidden_act="silu",
        max_position_embeddings=m.max_position_embeddings or m.seq_length,
        initializer_range=m.init_method_std,
        rms_norm_eps=m.norm_epsilon,
        use_cache=True,
        tie_word_embeddings=shape.tied_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
        attention_dropout=0.0,
        num_experts_per_tok=default_inference_k(cfg),
        output_router_logits=False,
        router_aux_loss_coef=m.moe_aux_loss_coeff,
        bos_token_id=special.get("bos"),
        eos_token_id=special.get("eos"),
        pad_token_id=special.get("pad"),
        dtype=str(dtype).replace("torch.", ""),
        elastic_moe=elastic_metadata(cfg, iteration),
    )
    if shape.architecture == "mixtral":
        from transformers import MixtralConfig

        config = MixtralConfig(
            intermediate_size=m.moe_ffn_hidden_size,
            num_local_experts=m.num_moe_experts,
            sliding_window=None,
            router_jitter_noise=0.0,
            **common,
        )
    else:
        from transformers import Qwen3MoeConfig

        config = Qwen3MoeConfig(
            intermediate_size=m.ffn_hidden_size or m.moe_ffn_hidden_size,  # dense MLP: no such layer
            moe_intermediate_size=m.moe_ffn_hidden_size,
            num_experts=m.num_moe_experts,
            # Qwen3-MoE renormalises the top-k probabilities iff norm_topk_prob; Megatron does iff
            # not moe_router_pre_softmax (softmax over the selected logits == renormalised top-k).
            norm_topk_prob=not m.moe_router_pre_softmax,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            attention_bias=False,
            use_sliding_window=False,
            **common,
        )
    config.architectures = [mapping.ARCHITECTURES[shape.architecture]]
    return config


# ------------------------------------------------------------------------------ reading tensors
_PLANNER_CLASS = None


def _slice_planner(targets: Dict[Tuple[str, Tuple[int, ...]], torch.Tensor]):
    """DCP load planner that reads given windows of stored tensors into given buffers.

    ``targets`` maps (key, global offsets of the window) -> buffer shaped like the window. The
    class is created once (torch.distributed.checkpoint is imported lazily): a class made per call
    would sit in a reference cycle holding ``targets`` until the cyclic GC ran, keeping every
    layer's buffers alive far past their use.
    """
    global _PLANNER_CLASS
    if _PLANNER_CLASS is None:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        class SlicePlanner(LoadPlanner):
            def __init__(self, targets):
                self.targets = targets
                self.metadata = None

            def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
                self.metadata = metadata

            def create_local_plan(self):
                items = []
                for (key, offsets), buf in self.targets.items():
                    chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=buf.size())
                    items += create_read_items_for_chunk_list(
                        key, self.metadata.state_dict_metadata[key], [chunk]
                    )
                return LoadPlan(items)

            def create_global_plan(self, plans):
                return plans

            def finish_plan(self, plan):
                return plan

            def load_bytes(self, read_item, value):
                raise RuntimeError(f"unexpected byte read for {read_item.dest_index.fqn}")

            def resolve_tensor(self, read_item):
                idx = read_item.dest_index
                t = self.targets[(idx.fqn, tuple(idx.offset))]
                for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                    if start != 0 or length != t.size(dim):
                        t = t.narrow(dim, start, length)
                return t

            def commit_tensor(self, read_item, tensor):
                pass  # resolve_tensor handed out views of the buffers: nothing to copy back

        _PLANNER_CLASS = SlicePlanner
    return _PLANNER_CLASS(targets)


class DistCheckpointSource:
    """Reads slices of a torch_dist checkpoint's global tensors, without a process group."""

    def __init__(self, ckpt_dir: Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.dir = Path(ckpt_dir)
        self.description = f"checkpoint {self.dir}"
        self._reader = FileSystemReader(str(self.dir))
        try:
            meta = self._reader.read_metadata()
        except Exception as exc:  # noqa: BLE001 - any unreadable metadata: name the directory
            raise IncompleteCheckpointError(f"{self.dir}: cannot read the checkpoint metadata ({exc})") from exc
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.dtypes: Dict[str, torch.dtype] = {}
        for key, md in meta.state_dict_metadata.items():
            # Model tensors only: optimizer state and TE/_extra_state byte blobs are not exported.
            if isinstance(md, TensorStorageMetadata) and not key.startswith("optimizer"):
                self.shapes[key] = tuple(md.size)
                self.dtypes[key] = md.properties.dtype

    def load(self, refs: Dict[str, Ref]) -> Dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        if not refs:
            return {}
        targets, views = {}, {}
        for name, ref in refs.items():
            buf = torch.empty((1,) * len(ref.index) + ref.shape, dtype=self.dtypes[ref.key])
            offsets = ref.index + (ref.row_offset,) + (0,) * (len(ref.shape) - 1)
            targets[(ref.key, offsets)] = buf
            views[name] = buf.view(ref.shape)
        planner = _slice_planner(targets)
        try:
            with warnings.catch_warnings():
                # DCP notes that it loads without a process group: that is the point here.
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load({}, storage_reader=self._reader, planner=planner, no_dist=True)
        finally:
            planner.targets = {}  # the caller owns the buffers now; nothing else may pin them
        return views


class StateDictSource:
    """The same interface over an in-memory state dict (``model.state_dict()`` of one rank with
    all experts, or a ``torch.save``d one): sequential and grouped expert names both resolve."""

    def __init__(self, state_dict: Dict[str, torch.Tensor], description: str = "state dict"):
        self.tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
        self.shapes = {k: tuple(v.shape) for k, v in self.tensors.items()}
        self.dtypes = {k: v.dtype for k, v in self.tensors.items()}
        self.description = description

    def load(self, refs: Dict[str, Ref]) -> Dict[str, torch.Tensor]:
        out = {}
        for name, ref in refs.items():
            t = self.tensors[ref.key].detach()
            for i in ref.index:
                t = t[i]
            if ref.shape[0] != t.shape[0]:
                t = t.narrow(0, ref.row_offset, ref.shape[0])
            out[name] = t
        return out


def plan_reads(source, shape: ModelShape) -> List[Tuple[str, Dict[str, Ref]]]:
    """Resolve every tensor up front: (group label, canonical name -> Ref) per group."""
    groups = [("embedding", mapping.megatron_embedding_tensors(shape))]
    groups += [(f"layer {i}", mapping.megatron_layer_tensors(shape, i)) for i in range(shape.num_layers)]
    groups.append(("final", mapping.megatron_final_tensors(shape)))
    return [(label, {t.name: mapping.resolve(t, shape, source.shapes, source.description) for t in tensors})
            for label, tensors in groups]


# ------------------------------------------------------------------------------ writing shards
def parse_size(size: Union[int, str]) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes (decimal units as in transformers, binary with i)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not m:
        raise ConversionError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB, 2GiB or a byte count")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2) or " ")
    return int(float(m.group(1)) * base ** power)


class ShardWriter:
    """Accumulates tensors and writes a safetensors shard whenever the next one would overflow.

    Shards are written under temporary names and renamed to model-0000k-of-0000N.safetensors at
    the end (N is unknown while streaming). A tensor that is a view into a larger storage is
    cloned on entry, so a queued slice never keeps a whole source tensor alive and safetensors
    never sees two entries sharing memory.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.buffer: Dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.files: List[Path] = []
        self.weight_map: Dict[str, int] = {}
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map or name in self.buffer:
            raise RuntimeError(f"internal: tensor {name} written twice")
        t = tensor.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        elif t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        nbytes = t.numel() * t.element_size()
        if self.buffer and self.buffer_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self.buffer[name] = t
        self.buffer_bytes += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        path = self.out_dir / f".shard-{len(self.files) + 1:05d}.tmp"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        for name in self.buffer:
            self.weight_map[name] = len(self.files)
        self.files.append(path)
        self.total_bytes += self.buffer_bytes
        self.buffer, self.buffer_bytes = {}, 0

    def finish(self) -> List[str]:
        self.flush()
        n = len(self.files)
        names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": {name: names[k] for name, k in sorted(self.weight_map.items())},
        }
        index_path = self.out_dir / "model.safetensors.index.json"
        index_path.write_text(json.dumps(index, indent=2) + "\n")
        # safetensors creates its files owner-only; give the shards the mode any other file of
        # this directory gets (the umask's), as save_pretrained's would have.
        mode = index_path.stat().st_mode & 0o777
        for tmp, final in zip(self.files, names):
            os.chmod(tmp, mode)
            os.replace(tmp, self.out_dir / final)
        return names


# ------------------------------------------------------------------------------ output handling
def prepare_output(output: Path, overwrite: bool, protect: Tuple[Path, ...] = ()) -> Path:
    """Check the target, return a fresh temporary sibling to write into (renamed at the end)."""
    output = Path(output)
    resolved = output.resolve()
    for p in protect:
        p = Path(p).resolve()
        if resolved == p or resolved in p.parents:
            raise ConversionError(f"output {output} would contain or replace the input {p}; choose another directory")
    if output.exists() and not overwrite:
        raise TargetExistsError(f"output {output} already exists; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_output(tmp: Path, output: Path) -> None:
    output = Path(output)
    if output.exists():
        if output.is_dir() and not output.is_symlink():
            shutil.rmtree(output)
        else:
            output.unlink()
    os.replace(tmp, output)


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
        if not path.is_file():
            raise ConversionError(f"tokenizer model {path} does not exist")
        return path
    configured = cfg.data.tokenizer_model
    if configured and Path(configured).is_file():
        return Path(configured)
    raise ConversionError(
        f"the checkpoint's tokenizer (data.tokenizer_model={configured!r}) is not available here: "
        "pass --tokenizer-model path/to/spm.model, or --no-tokenizer to export the weights alone"
    )


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
    tok_path = _tokenizer_path(cfg, tokenizer_model)
    special = None
    if tok_path is not None:
        from megatron_elastic.convert.hf_tokenizer import special_token_ids

        special = special_token_ids(tok_path)
        if special["vocab_size"] > vocab:
            raise mapping.ShapeMismatchError(
                f"tokenizer {tok_path} has {special['vocab_size']} pieces but the embedding "
                f"'{emb}' has only {vocab} rows: the tokenizer does not belong to this model"
            )
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
        config = hf_config(cfg, shape, out_dtype, special, iteration)
        config.save_pretrained(str(tmp))
        from transformers import GenerationConfig

        gen = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        )
        gen.save_pretrained(str(tmp))
        if tok_path is not None:
            from megatron_elastic.convert.hf_tokenizer import save_hf_tokenizer

            save_hf_tokenizer(tok_path, tmp, model_max_length=cfg.model.max_position_embeddings or cfg.model.seq_length)
        commit_output(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.seconds = time.time() - start
    return result


def preload() -> None:
    """Import every library the export uses (for memory measurements that exclude imports)."""
    import safetensors.torch  # noqa: F401
    import tokenizers  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import transformers  # noqa: F401
    from megatron.core import dist_checkpointing  # noqa: F401
    from transformers import GenerationConfig, MixtralConfig, PreTrainedTokenizerFast, Qwen3MoeConfig  # noqa: F401

    from megatron_elastic.convert import hf_tokenizer  # noqa: F401
    from megatron_elastic.training import checkpoint  # noqa: F401


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
) -> ExportResult:
    """Export the checkpoint at ``load`` (run root or ``iter_N`` dir) to ``output``.

    ``architecture``: None/'auto' (Qwen3-MoE with QK-norm, Mixtral without), 'mixtral' or
    'qwen3_moe'. ``dtype``: None/'auto' keeps the stored dtype. ``tokenizer_model``: None uses the
    checkpoint config's sentencepiece model, a path overrides it, False skips the tokenizer.
    ``config``: describes a checkpoint that does not record its own.
    """
    ckpt_dir = find_checkpoint_dir(load)
    cfg, iteration, _ = read_checkpoint_config(ckpt_dir, config)
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
