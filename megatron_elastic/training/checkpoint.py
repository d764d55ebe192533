"""Checkpoints in Megatron-core's distributed format, with an atomic ``latest`` tracker.

Layout (Megatron-LM's names, so its tooling recognises a run directory)::

    <save>/latest_checkpointed_iteration.txt    iteration of the newest *complete* save
    <save>/iter_0000200/                        megatron.core.dist_checkpointing directory
    <save>/iter_0000200/run_config.yaml         the config that produced it (human-readable)

A save writes ``iter_N.partial`` first, renames it to ``iter_N`` once every rank has finished,
and only then replaces the tracker (write temp file, fsync, ``os.replace``). A save interrupted at
any point, by a crash or a second preemption signal, therefore leaves the previous checkpoint and
the tracker untouched. Contents: model and optimizer (sharded), iteration, consumed samples,
config, and every rank's RNG states; the learning rate is a function of the iteration and the data
position is the iteration (see training/data.py), so nothing else is needed for an exact resume.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_elastic.config import Config, save_config
from megatron_elastic.device import policy

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def iter_dir(root, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def read_tracker(root) -> Optional[int]:
    """The newest complete iteration under ``root``, or None when there is none."""
    path = Path(root) / TRACKER
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if text == "release":
        return 0
    try:
        iteration = int(text)
    except ValueError as exc:
        raise CheckpointError(f"{path} holds {text!r}, not an iteration number") from exc
    if not iter_dir(root, iteration).is_dir():
        raise CheckpointError(
            f"{path} points at iteration {iteration} but {iter_dir(root, iteration)} is missing"
        )
    return iteration


def _write_tracker(root: Path, iteration: int) -> None:
    tmp = root / f".{TRACKER}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / TRACKER)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    return policy().rng_state()


def _set_rng_state(state: dict) -> None:
    policy().set_rng_state(state)


def _state_dict(model, optimizer, cfg: Config, iteration: int, with_rng: bool, for_load: bool):
    model_sd = model.sharded_state_dict()
    state = {
        "model": model_sd,
        "iteration": iteration,
        "consumed_samples": iteration * cfg.train.global_batch_size,
        "config": cfg.to_dict(),
        "world_size": _world(),
        "checkpoint_version": CHECKPOINT_VERSION,
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=for_load)
    if with_rng:
        state["rng_state"] = ShardedObject(
            "rng_state", _rng_state(), (_world(),), (_rank(),), replica_id=0
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
    partial = final.with_name(final.name + ".partial")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)  # debris of an interrupted save of this iteration
        partial.mkdir()
    _barrier()
    state = _state_dict(model, optimizer, cfg, iteration, with_rng=True, for_load=False)
    dist_checkpointing.save(state, str(partial))
    _barrier()
    if _rank() == 0:
        save_config(cfg, partial / "run_config.yaml")
        if final.exists():
            # Re-saving an iteration (e.g. after a resume): swap, then drop the old copy.
            old = final.with_name(final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(partial, final)
            shutil.rmtree(old)
        else:
            os.replace(partial, final)
        _write_tracker(root, iteration)
    _barrier()
    return final


def resolve_load_dir(path) -> Optional[Path]:
    """``path`` may be a run's checkpoint root (uses the tracker) or one ``iter_N`` directory."""
    path = Path(path)
    if path.name.endswith(".partial"):
        raise CheckpointError(f"{path} is an interrupted save; load its parent directory instead")
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
    iteration = read_tracker(path)
    if iteration is None:
        partials = sorted(p.name for p in path.glob("iter_*.partial"))
        if partials:
            raise CheckpointError(
                f"{path} has no complete checkpoint (only interrupted saves: {', '.join(partials)}); "
                "delete them or point checkpoint.load elsewhere"
            )
        return None
    return iter_dir(path, iteration)


def check_compatible(ckpt_dir: Path, model) -> None:
    """Fail with the tensor's name and both shapes before loading anything mismatched."""
    try:
        saved = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    except Exception as exc:  # noqa: BLE001 - surface any metadata problem with the path
        raise CheckpointError(f"{ckpt_dir} is not a readable distributed checkpoint: {exc}") from exc
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    for sh in nested_values(model.sharded_state_dict()):
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
    if finetune or _rank() != 0:
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
    ckpt_dir = resolve_load_dir(path)
    if ckpt_dir is None:
        return 0
    check_compatible(ckpt_dir, model)
    common = dist_checkpointing.load_common_state_dict(str(ckpt_dir))
    iteration = int(common.get("iteration", 0))
    _warn_config_drift(common.get("config") or {}, cfg, ckpt_dir, finetune)
    same_world = common.get("world_size") == _world()
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
    model.load_state_dict(state["model"], strict=True)
    if load_optimizer:
        optimizer.load_state_dict(state["optimizer"])
    if "rng_state" in state:
        _set_rng_state(state["rng_state"])
    return 0 if finetune else iteration
