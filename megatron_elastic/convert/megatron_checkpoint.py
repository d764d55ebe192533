"""Reading a Megatron-core distributed checkpoint: locating it, its run config, its tensors.

* Locating: ``find_checkpoint_dir`` turns a run root (via the tracker) or an ``iter_N`` directory
  into a verified iteration directory (``training/checkpoint.resolve_load_dir`` /
  ``verified_dir``: the manifest its save wrote), refusing interrupted saves.
* The run config: ``recover_run_config`` is the one place that recovers the configuration a
  checkpoint was saved with (the ``config`` entry of ``common.pt``, the ``run_config.yaml`` next
  to it, or an explicit replacement); the exporter (``read_checkpoint_config``) and the elastic
  evaluation (``eval/cli.py``) both use it.
* Tensors: a ``torch_dist`` checkpoint is a PyTorch Distributed Checkpoint (DCP) whose tensors are
  stored under *global* keys and shapes, independent of the tensor/expert-parallel layout that
  wrote them (EP ranks each save their own experts at their global offsets of one
  ``[layers, experts, ...]`` tensor). ``DistCheckpointSource`` reads the DCP metadata and asks DCP
  for exactly the slices of one group (one layer) at a time (``_slice_planner``), so no process
  group, no model and no full state dict is ever built. Megatron's own
  ``dist_checkpointing.load`` cannot do this in one process: it insists that the requested shards
  cover each tensor whole. ``StateDictSource`` offers the same interface over an in-memory state
  dict; ``plan_reads`` resolves every tensor an architecture needs up front
  (``mapping.resolve``: missing tensors and shape mismatches fail before anything is written).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from megatron_elastic.config import Config, ConfigError
from megatron_elastic.convert import ConversionError, IncompleteCheckpointError
from megatron_elastic.convert import mapping
from megatron_elastic.convert.mapping import ModelShape, Ref


# --------------------------------------------------------------------------- locating the save
FALLBACK_HINT = "pass --fallback-to-last-good to export it"


def find_checkpoint_dir(path: Union[str, os.PathLike], fallback_to_last_good: bool = False) -> Path:
    """The iteration directory to export from a run root (via the tracker) or an ``iter_N`` dir.

    Iteration 0 is a valid checkpoint like any other (the tracker holds "0"): nothing here treats
    a falsy iteration as "no checkpoint". The directory is checked against the manifest its save
    wrote (training/checkpoint.py); a damaged one fails naming the file and the newest complete
    earlier checkpoint, which ``fallback_to_last_good`` exports instead.
    """
    from megatron_elastic.training.checkpoint import CheckpointError, resolve_load_dir, verified_dir

    path = Path(path)
    if not path.exists():
        raise ConversionError(f"checkpoint path {path} does not exist")
    if path.name.endswith(".partial") or path.name.endswith(".old"):
        raise IncompleteCheckpointError(
            f"{path} is an interrupted save ({path.suffix} directory), not a complete checkpoint; "
            "point --load at the run's checkpoint root or a complete iter_N directory"
        )
    if _looks_like_iteration_dir(path):
        try:
            found = verified_dir(path, fallback_to_last_good, FALLBACK_HINT)
        except CheckpointError as exc:
            raise IncompleteCheckpointError(str(exc)) from exc
        _check_complete(found)
        return found
    try:
        found = resolve_load_dir(path, fallback_to_last_good, FALLBACK_HINT)
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


# ------------------------------------------------------------------------------ the run config
class UnreadableCommonStateError(ConversionError):
    """``common.pt`` of a checkpoint could not be loaded (``cause`` holds the original error)."""

    def __init__(self, ckpt_dir: Path, cause: BaseException):
        super().__init__(f"{ckpt_dir}: cannot read the checkpoint's common state ({cause})")
        self.cause = cause


def load_common_state(ckpt_dir: Path) -> dict:
    """The checkpoint's common (non-sharded) state: iteration, config, ... (``common.pt``)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(ckpt_dir))


def recover_run_config(
    ckpt_dir: Path,
    config: Union[None, str, os.PathLike, Config] = None,
    overrides: Optional[Sequence[str]] = None,
    *,
    common: Optional[dict] = None,
    run_config_first: bool = False,
    lenient: bool = True,
    saved_source: Optional[str] = None,
) -> Optional[Tuple[Config, str]]:
    """The run config a checkpoint was saved with, as (config, where it came from); None when the
    checkpoint records none (the caller names the fix: pass the recipe explicitly).

    ``config`` replaces the saved config: a ``Config`` is used as is, a path is read as a recipe.
    Otherwise the ``config`` entry of the common state (``common``, loaded here when not given;
    a failure raises ``UnreadableCommonStateError``) comes before the ``run_config.yaml`` next to
    it, or after it with ``run_config_first``. ``overrides`` (``section.key=value``) are applied
    before validation. ``lenient``: keys this version does not know (older/newer checkpoints) are
    dropped rather than rejected. ``saved_source`` names the common state's config in errors
    (default ``<ckpt_dir>/common.pt``).
    """
    from megatron_elastic.config import load_config

    ckpt_dir = Path(ckpt_dir)
    overrides = list(overrides or [])
    if isinstance(config, Config):
        return (config.apply_overrides(overrides).validate() if overrides else config), "the given config"
    if config is not None:
        return load_config(config, overrides), str(config)
    yaml_path = ckpt_dir / "run_config.yaml"

    def from_yaml() -> Optional[Tuple[Config, str]]:
        if not yaml_path.is_file():
            return None
        if not lenient:
            return load_config(yaml_path, overrides), str(yaml_path)
        import yaml

        raw = yaml.safe_load(yaml_path.read_text())
        return _config_from_saved_dict(raw, str(yaml_path), overrides), str(yaml_path)

    if run_config_first:
        found = from_yaml()
        if found is not None:
            return found
    if common is None:
        try:
            common = load_common_state(ckpt_dir)
        except Exception as exc:  # noqa: BLE001 - any unreadable common state: name the directory
            raise UnreadableCommonStateError(ckpt_dir, exc) from exc
    raw = common.get("config") if isinstance(common, dict) else None
    if isinstance(raw, dict) or (not lenient and raw is not None):
        source = saved_source or f"{ckpt_dir}/common.pt"
        if lenient:
            return _config_from_saved_dict(raw, source, overrides), "the checkpoint"
        cfg = Config.from_dict(raw, source=source)
        if overrides:
            cfg = cfg.apply_overrides(overrides)
        return cfg.validate(), "the checkpoint"
    return None if run_config_first else from_yaml()


def read_checkpoint_config(ckpt_dir: Path, override: Union[None, str, os.PathLike, Config] = None
                           ) -> Tuple[Config, Optional[int], str]:
    """(config, iteration, where the config came from).

    Order: an explicit ``override``; the ``config`` entry of the common state (what
    ``save_checkpoint`` writes); the ``run_config.yaml`` next to it. A checkpoint that lacks both
    (saved by another tool) is not rejected outright: the caller can pass a config describing it.
    A missing iteration is reported as None rather than treated as an error.
    """
    common = load_common_state(ckpt_dir)
    iteration = common.get("iteration")
    iteration = int(iteration) if iteration is not None else None
    found = recover_run_config(ckpt_dir, override, common=common)
    if found is None:
        raise ConversionError(
            f"{ckpt_dir} records no model configuration (no 'config' in common.pt, no run_config.yaml); "
            "pass the recipe it was trained with (--config path/to/recipe.yaml)"
        )
    return found[0], iteration, found[1]


def _config_from_saved_dict(raw: dict, source: str, overrides: Sequence[str] = ()) -> Config:
    """Config.from_dict, tolerating keys this version does not know (older/newer checkpoints)."""
    import dataclasses

    from megatron_elastic.config import SECTIONS

    def build(values: dict) -> Config:
        cfg = Config.from_dict(values, source=source)
        return (cfg.apply_overrides(list(overrides)) if overrides else cfg).validate()

    try:
        return build(raw)
    except ConfigError:
        pass
    cleaned = {}
    for section, cls in SECTIONS.items():
        known = {f.name for f in dataclasses.fields(cls)}
        cleaned[section] = {k: v for k, v in (raw.get(section) or {}).items() if k in known}
    try:
        return build(cleaned)
    except ConfigError as exc:
        raise ConversionError(f"{source}: the saved config is not usable ({exc}); pass --config") from exc


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
