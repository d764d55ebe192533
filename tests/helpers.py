"""Shared test utilities: multi-process gloo runs and tiny configs."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, List

import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    path = Path(out_dir) / f"rank{rank}.pkl"
    try:
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - ship any failure to the parent
        result = ("error", traceback.format_exc())
    with open(path, "wb") as f:
        pickle.dump(result, f)
    if result[0] == "error":
        sys.exit(1)


def run_distributed(fn: Callable, world_size: int, *args: Any, tmp_dir: Path, timeout: float = 600) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes (gloo on 127.0.0.1).

    Returns each rank's return value; raises with the worker's traceback if any rank failed.
    ``fn`` must be importable (a module-level function of a test module).
    """
    out = Path(tmp_dir) / f"dist-{free_port()}"
    out.mkdir(parents=True)
    port = free_port()
    ctx = mp.start_processes(
        _worker, args=(world_size, port, str(out), fn, args), nprocs=world_size,
        join=False, start_method="spawn",
    )
    import time

    deadline = time.monotonic() + timeout
    failure = None
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"distributed run did not finish within {timeout}s")
    except mp.ProcessExitedException as exc:  # a rank failed: report its traceback below
        failure = exc
    results = []
    for rank in range(world_size):
        path = out / f"rank{rank}.pkl"
        if not path.exists():
            if failure is not None:
                continue
            raise AssertionError(f"rank {rank} produced no result")
        status, value = pickle.loads(path.read_bytes())
        if status != "ok":
            raise AssertionError(f"rank {rank} failed:\n{value}")
        results.append(value)
    if failure is not None:
        raise AssertionError(f"distributed run failed: {failure}")
    return results


def run_tool(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python tools/<name>.py ...`` (or any argv) from the repo root."""
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def tiny_overrides(data: dict, run_dir: Path, **extra) -> list:
    """Overrides that turn configs/smoke.yaml into a seconds-long run on ``data``."""
    base = {
        "model.num_layers": 2,
        "model.hidden_size": 32,
        "model.num_attention_heads": 4,
        "model.num_query_groups": 2,
        "model.seq_length": 32,
        "model.num_moe_experts": 4,
        "model.moe_ffn_hidden_size": 32,
        "train.micro_batch_size": 2,
        "train.global_batch_size": 4,
        "train.train_iters": 6,
        "train.eval_interval": 0,
        "train.eval_iters": 1,
        "train.lr_warmup_iters": 0,
        "data.data_path": f"[{data['prefix']}]",
        "data.tokenizer_model": str(data["tokenizer"]),
        "data.split": "90,10,0",
        "checkpoint.save": "null",
        "checkpoint.load": "null",
        "checkpoint.save_interval": "null",
        "logging.tensorboard_dir": "null",
        "logging.log_interval": 1,
        "elastic.schedule": "fixed",
        "elastic.k_min": 2,
        "elastic.k_max": 2,
        "elastic.pool_ratio": "null",
        "elastic.router_loss_coeff": 0.0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def train_run(rank: int, world_size: int, overrides: list, max_iters=None) -> dict:
    """One training run of configs/smoke.yaml + ``overrides`` in this (spawned) process, for
    ``run_distributed``: the per-iteration losses, final iteration, validation loss, checkpoint."""
    from megatron_elastic import parallel
    from megatron_elastic.config import load_config
    from megatron_elastic.train import run

    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides)
    try:
        result = run(cfg, max_iters=max_iters)
    finally:
        parallel.destroy()
    return {"losses": result.losses, "iteration": result.iteration, "valid": result.valid_loss,
            "checkpoint": result.checkpoint}
