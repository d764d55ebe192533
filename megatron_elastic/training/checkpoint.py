"""Checkpoints in Megatron-core's distributed format: durable, verified, with an atomic tracker.

Layout (Megatron-LM's names, so its tooling recognises a run directory)::

    <save>/latest_checkpointed_iteration.txt    iteration of the newest *complete* save
    <save>/iter_0000200/                        megatron.core.dist_checkpointing directory
    <save>/iter_0000200/run_config.yaml         the config that produced it (human-readable)
    <save>/iter_0000200/manifest.json           every file's name, size (and CRC32; written last)

A save writes ``iter_N.partial`` first. Once every rank has finished, each rank records the size
(with ``checkpoint.checksum``: also the CRC32) of the files it wrote (``__<rank>_*.distcp``; rank
0 the rest) and fsyncs them; rank 0 writes ``manifest.json``, fsyncs the directory, renames it to
``iter_N``, fsyncs the parent, and only then replaces the tracker (write temp file, fsync, ``os.replace``, fsync the parent). A save
interrupted at any point, by a crash, a lost node or a second preemption signal, therefore leaves
the previous checkpoint and the tracker untouched, and what the tracker names is on disk.

A re-save of an existing iteration moves the old directory aside (``iter_N.old``), renames the
new one in, updates the tracker, then deletes the aside copy; a reader that finds the tracker's
``iter_N`` missing uses ``iter_N.old`` (the swap was interrupted between its two renames).

A load checks the manifest first (missing files such as ``common.pt``, sizes, CRC32s) and names the
damaged file and the newest complete earlier checkpoint; ``checkpoint.fallback_to_last_good``
loads that one instead. Checkpoints without a manifest (older saves, other tools) load unchecked.

The files-on-disk half (layout, tracker, fsync, manifest, publish, retention) is
``checkpoint_files.py``; this module is the save and load protocol over Megatron's
dist_checkpointing.

Another layout loads it: tensors are stored under global keys and shapes (``model_state_dicts``),
so a save under (TP, EP, PP, VP, DP) resumes under any other valid layout of the same model,
optimizer state included (the CPU optimizer's state is keyed by the model's sharded tensors;
Megatron's distributed optimizer uses its default ``fully_sharded_model_space`` format, which is
reshardable too). RNG states are restored only under the same world size. A layout the model
cannot take (experts not divisible by the new EP, layers by the new PP x VP) is refused by config
validation before anything loads.

Contents: model and optimizer (sharded), iteration, consumed samples, config, and every rank's RNG
states; the learning rate is a function of the iteration and the data position is the iteration
(see megatron_elastic/data/datasets.py), so nothing else is needed for an exact resume.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_elastic.config import Config, save_config
from megatron_elastic.device import policy
from megatron_elastic.training.checkpoint_files import (  # noqa: F401 (re-exported)
    CHECKPOINT_VERSION,
    CheckpointError,
    Damage,
    FALLBACK_HINT,
    ITER_RE,
    MANIFEST,
    PARTIAL_SUFFIX,
    TRACKER,
    TrackerError,
    barrier,
    fsync_tree,
    iter_dir,
    last_good_checkpoint,
    publish,
    read_tracker,
    retain,
    seal,
    sibling,
    this_rank,
    tracked_checkpoint,
    verify,
    verify_checkpoint,
    world_size,
    write_manifest,
)


def _rng_state() -> dict:
    return policy().rng_state()


def _set_rng_state(state: dict) -> None:
    policy().set_rng_state(state)


def model_state_dicts(model) -> dict:
    """This rank's model shards: ``{"model": ...}`` for one chunk, ``{"model0": ..., "model1":
    ...}`` for virtual pipeline stages (Megatron-LM's names). The dict structure is local; the
    sharded tensors inside carry global keys, layer offsets and shapes (a pipeline stage's layer
    i is stored as global layer offset + i), so a checkpoint reloads under any TP/EP/PP/VP
    layout of the same model: ``dist_checkpointing.load`` reads whatever slices the template
    of the new layout asks for."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _state_dict(model, optimizer, cfg: Config, iteration: int, with_rng: bool, for_load: bool):
    model_sd = model_state_dicts(model)
    state = {
        **model_sd,
        "iteration": iteration,
        "consumed_samples": iteration * cfg.train.global_batch_size,
        "config": cfg.to_dict(),
        "world_size": world_size(),
        "checkpoint_version": CHECKPOINT_VERSION,
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=for_load)
    if with_rng:
        state["rng_state"] = ShardedObject(
            "rng_state", _rng_state(), (world_size(),), (this_rank(),), replica_id=0
        )
    return state


_writer_manager = None
# Runs in the manager process (exec'd: a stdlib-only initializer needs no import of this module
# there): ignore the stop signals (a process-wide disposition; a signal mask would be per thread,
# and the process has threads by then), and exit if the trainer dies without shutting it down
# (SIGKILL, OOM), since a process that ignores SIGTERM would otherwise linger.
_WRITER_MANAGER_INIT = """
import os, signal, threading, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
def _exit_with_parent(parent=os.getppid()):
    while os.getppid() == parent:
        time.sleep(2)
    os._exit(0)
threading.Thread(target=_exit_with_parent, daemon=True).start()
"""


def protect_checkpoint_writer() -> None:
    """Start dist_checkpointing's writer-results manager now, deaf to SIGTERM/SIGUSR1.

    Megatron's filesystem writer collects write results through a ``multiprocessing`` Manager: a
    spawned server process, created at the first save and kept. Launchers signal whole process
    groups (torchrun's killpg, Slurm signals every process of a step), and with the default
    disposition that server dies of the very SIGTERM/SIGUSR1 that asks for a preemption
    checkpoint, so the save fails (EOFError/BrokenPipeError). This server ignores both signals; it
    still stops when the trainer exits (the manager's shutdown message) or dies. Idempotent.
    """
    global _writer_manager
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa
    except ImportError:
        return
    if not hasattr(fsa, "_get_write_results_queue") or getattr(fsa, "_results_queue", None) is not None:
        return
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=exec, initargs=(_WRITER_MANAGER_INIT, {}))
    fsa._results_queue = manager.Queue()
    _writer_manager = manager


def save_checkpoint(root, model, optimizer, cfg: Config, iteration: int) -> Path:
    """Save collectively (every rank calls it); returns the final directory."""
    protect_checkpoint_writer()
    root = Path(root)
    final = iter_dir(root, iteration)
    partial = sibling(final, PARTIAL_SUFFIX)
    if this_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)  # debris of an interrupted save of this iteration
        partial.mkdir()
    barrier()
    state = _state_dict(model, optimizer, cfg, iteration, with_rng=True, for_load=False)
    dist_checkpointing.save(state, str(partial))
    barrier()
    if this_rank() == 0:
        save_config(cfg, partial / "run_config.yaml")
    checksum = bool(cfg.checkpoint.checksum)
    entries = seal(partial, checksum)
    if dist.is_initialized():
        gathered: list = [None] * world_size()
        dist.all_gather_object(gathered, entries)
        entries = {name: e for part in gathered for name, e in part.items()}
    if this_rank() == 0:
        write_manifest(partial, iteration, entries, checksum)
        fsync_tree(partial)
        publish(root, partial, final, iteration)
        retain(root, iteration, cfg.checkpoint.keep_last)
    barrier()
    return final


def _damaged(problem: str, root: Path, below: Optional[int], fallback: bool, hint: str) -> Path:
    """Raise the one-line error for a damaged checkpoint, or return the earlier one to load."""
    earlier = last_good_checkpoint(root, below)
    if earlier is None:
        where = "below it" if below is not None else "at all"
        raise CheckpointError(
            f"{problem}; {root} holds no complete earlier checkpoint {where}: restore the file from a "
            "copy, or point checkpoint.load elsewhere"
        )
    if not fallback:
        raise CheckpointError(f"{problem}; the newest complete earlier checkpoint is {earlier} ({hint})")
    if this_rank() == 0:
        print(f"warning: {problem}; loading the newest complete earlier checkpoint {earlier} instead",
              flush=True)
    return earlier


def verified_dir(directory, fallback_to_last_good: bool = False, hint: str = FALLBACK_HINT) -> Path:
    """``directory`` (one ``iter_N``) if it matches its manifest; else the one-line CheckpointError
    naming the bad file and the newest complete earlier sibling, or that sibling on fallback."""
    directory = Path(directory)
    try:
        verify(directory)
    except Damage as damage:
        m = ITER_RE.match(directory.name)
        return _damaged(f"checkpoint {directory} is damaged: {damage.problem}", directory.parent,
                        int(m.group(1)) if m else None, fallback_to_last_good, hint)
    return directory


def resolve_load_dir(path, fallback_to_last_good: bool = False, hint: str = FALLBACK_HINT) -> Optional[Path]:
    """``path`` may be a run's checkpoint root (uses the tracker) or one ``iter_N`` directory.

    The directory found is checked against its manifest. A damaged one (or a damaged tracker)
    raises CheckpointError naming the bad file and the newest complete earlier checkpoint, or,
    with ``fallback_to_last_good``, returns that earlier checkpoint. ``hint`` tells the reader how
    to ask for the fallback in the calling tool.
    """
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX):
        raise CheckpointError(f"{path} is an interrupted save; load its parent directory instead")
    if (path / MANIFEST).is_file():
        # A manifest is written only after every file of the save: whatever is missing now
        # (.metadata included) was lost afterwards, and the manifest check names it.
        return verified_dir(path, fallback_to_last_good, hint)
    if (path / "metadata.json").is_file():
        # Megatron writes metadata.json and common.pt first and the tensor index (.metadata) last:
        # only the latter proves the save finished.
        if not (path / ".metadata").is_file():
            raise CheckpointError(
                f"{path} is an incomplete save (no .metadata): it was interrupted while writing; "
                "load the run's checkpoint root to use the last complete iteration"
            )
        return path
    if not path.exists():
        return None
    try:
        tracked = tracked_checkpoint(path)
    except TrackerError as exc:
        return _damaged(str(exc), path, exc.iteration, fallback_to_last_good, hint)
    if tracked is None:
        partials = sorted(p.name for p in path.glob(f"iter_*{PARTIAL_SUFFIX}"))
        if partials:
            raise CheckpointError(
                f"{path} has no complete checkpoint (only interrupted saves: {', '.join(partials)}); "
                "delete them or point checkpoint.load elsewhere"
            )
        return None
    iteration, directory = tracked
    try:
        verify(directory)
    except Damage as damage:
        # below the tracker's iteration (the directory may be the aside copy ``iter_N.old``)
        return _damaged(f"checkpoint {directory} is damaged: {damage.problem}", path, iteration,
                        fallback_to_last_good, hint)
    return directory


def _resolve_collectively(path, fallback: bool) -> Optional[Path]:
    """Rank 0 resolves and verifies (one read of the checkpoint, one decision); the rest follow."""
    if not dist.is_initialized() or world_size() == 1:
        return resolve_load_dir(path, fallback)
    outcome: list = [None]
    if this_rank() == 0:
        try:
            found = resolve_load_dir(path, fallback)
            outcome[0] = ("ok", None if found is None else str(found))
        except CheckpointError as exc:
            outcome[0] = ("error", str(exc))
        except Exception as exc:  # noqa: BLE001 - never leave the other ranks waiting
            outcome[0] = ("error", f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}")
    device = policy().device if dist.get_backend() == "nccl" else None
    dist.broadcast_object_list(outcome, src=0, device=device)
    status, value = outcome[0]
    if status == "error":
        raise CheckpointError(value)
    return None if value is None else Path(value)


def check_compatible(ckpt_dir: Path, model) -> None:
    """Fail with the tensor's name and both shapes before loading anything mismatched."""
    try:
        saved = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    except Exception as exc:  # noqa: BLE001 - surface any metadata problem with the path
        raise CheckpointError(f"{ckpt_dir} is not a readable distributed checkpoint: {exc}") from exc
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    for sh in nested_values(model_state_dicts(model)):
        if not isinstance(sh, ShardedTensor):
            continue
        if sh.key not in saved:
            raise CheckpointError(
                f"checkpoint {ckpt_dir} has no tensor '{sh.key}' that this model needs: the config "
                "describes a different architecture (layers, experts, QK-norm) than the checkpoint"
            )
        have = tuple(saved[sh.key].global_shape)
        if have != tuple(sh.global_shape):
            raise CheckpointError(
                f"shape mismatch for '{sh.key}': checkpoint {have}, model {tuple(sh.global_shape)}; "
                "the config's model section does not match the checkpoint (check hidden_size, "
                "num_moe_experts, moe_ffn_hidden_size, vocab size, num_query_groups)"
            )


def _warn_config_drift(saved: dict, cfg: Config, ckpt_dir: Path, finetune: bool) -> None:
    """A resume with a changed schedule or batch silently changes the run; say so, on rank 0."""
    if finetune or this_rank() != 0:
        return
    now = cfg.to_dict()
    changed = [
        f"{section}.{key}: {saved[section][key]!r} -> {value!r}"
        for section in ("train", "elastic", "model")
        for key, value in now.get(section, {}).items()
        if section in saved and key in saved[section] and saved[section][key] != value
    ]
    if changed:
        print(f"warning: resuming from {ckpt_dir} with a different config: " + "; ".join(changed),
              flush=True)


def load_checkpoint(path, model, optimizer, cfg: Config, finetune: bool = False) -> int:
    """Load into ``model`` (and ``optimizer``); return the iteration to continue from.

    Returns 0 when ``path`` holds no checkpoint yet (a fresh run with load == save).
    """
    ckpt_dir = _resolve_collectively(path, cfg.checkpoint.fallback_to_last_good)
    if ckpt_dir is None:
        return 0
    check_compatible(ckpt_dir, model)
    common = dist_checkpointing.load_common_state_dict(str(ckpt_dir))
    iteration = int(common.get("iteration", 0))
    _warn_config_drift(common.get("config") or {}, cfg, ckpt_dir, finetune)
    same_world = common.get("world_size") == world_size()
    load_optimizer = optimizer is not None and not finetune
    template = _state_dict(
        model,
        optimizer if load_optimizer else None,
        cfg,
        iteration,
        with_rng=same_world and not finetune,
        for_load=True,
    )
    state = dist_checkpointing.load(template, str(ckpt_dir))
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    names = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, name in zip(chunks, names):
        chunk.load_state_dict(state[name], strict=True)
    if load_optimizer:
        optimizer.load_state_dict(state["optimizer"])
    if "rng_state" in state:
        _set_rng_state(state["rng_state"])
    return 0 if finetune else iteration
