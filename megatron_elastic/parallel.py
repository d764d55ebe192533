"""Process-group bring-up from torchrun or SLURM environment variables.

torchrun exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under ``srun`` with
one task per GPU (our sbatch launcher), SLURM exports SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID
and the launcher sets MASTER_ADDR/PORT; we accept either so the same entry point runs under both.
A single process with none of these set runs as world size 1 on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_elastic import compat
from megatron_elastic.config import Config, ConfigError
from megatron_elastic.device import policy, seed_all


class RendezvousError(RuntimeError):
    """The process group cannot form: unreachable master, missing rendezvous variables."""


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def read_dist_env() -> DistEnv:
    env = os.environ
    rank = env.get("RANK", env.get("SLURM_PROCID", "0"))
    world = env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1"))
    local = env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = env.get("MASTER_PORT")
    if port is None:
        if int(world) > 1:
            raise RendezvousError(
                "MASTER_PORT is not set for a multi-process run: launch with torchrun or "
                "launchers/slurm/pretrain.sbatch, or export MASTER_ADDR and MASTER_PORT"
            )
        port = str(_free_port())
    return DistEnv(int(rank), int(world), int(local), addr, int(port))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_master_reachable(addr: str, port: int, timeout_s: float, rank: int) -> None:
    """Fail fast with a clear message instead of hanging in the rendezvous.

    Rank 0 hosts the TCP store, so only the other ranks probe it; they retry until timeout_s
    because rank 0 may still be starting.
    """
    if rank == 0:
        try:
            socket.getaddrinfo(addr, port)
        except socket.gaierror as exc:
            raise RendezvousError(f"MASTER_ADDR={addr} does not resolve: {exc}") from exc
        return
    import time

    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((addr, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as exc:
            last_error = exc
            time.sleep(0.5)
    raise RendezvousError(
        f"rank {rank}: cannot reach MASTER_ADDR={addr}:{port} within {timeout_s:.0f}s "
        f"({last_error}); check that rank 0 started and that the address/port are reachable "
        "from this node (firewall, wrong interface, MASTER_ADDR from scontrol show hostnames)"
    )


def collective_timeout(cfg: Config) -> timedelta:
    """How long any collective (and the rendezvous) may wait for a peer before this rank fails.

    ``parallel.distributed_timeout_minutes`` (a float: 0.25 = 15 s), or the environment variable
    ``MEGATRON_ELASTIC_TIMEOUT_S`` in seconds, which wins (tests use a few seconds). Applied to the
    default group and to every Megatron subgroup, so a rank whose peer died never waits longer.
    """
    raw = os.environ.get("MEGATRON_ELASTIC_TIMEOUT_S")
    if raw:
        try:
            seconds = float(raw)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:
            raise ConfigError(
                f"MEGATRON_ELASTIC_TIMEOUT_S={raw!r} must be a positive number of seconds "
                "(or unset to use parallel.distributed_timeout_minutes)"
            )
        return timedelta(seconds=seconds)
    return timedelta(minutes=cfg.parallel.distributed_timeout_minutes)


def initialize(cfg: Config, master_timeout_s: float | None = None) -> DistEnv:
    """Initialise torch.distributed and Megatron-core's parallel state for this config."""
    compat.enable()
    env = read_dist_env()
    cfg.validate_world(env.world_size)
    backend = cfg.parallel.distributed_backend or policy().backend
    timeout = collective_timeout(cfg)
    if backend == "nccl":
        # Without it a NCCL collective whose peer died blocks past the timeout; with it the
        # watchdog aborts the communicator and the rank exits (set before the group exists).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    policy().set_local_device(env.local_rank)
    if not dist.is_initialized():
        if env.world_size > 1:
            probe = master_timeout_s
            if probe is None:
                probe = float(os.environ.get("MEGATRON_ELASTIC_MASTER_TIMEOUT", "120"))
            check_master_reachable(env.master_addr, env.master_port, probe, env.rank)
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{_bracket(env.master_addr)}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
        )
    if not parallel_state.model_parallel_is_initialized():
        p = cfg.parallel
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
            context_parallel_size=p.context_parallel_size,
            expert_model_parallel_size=p.expert_model_parallel_size,
            expert_tensor_parallel_size=p.expert_tensor_parallel_size,
            create_gloo_process_groups=True,
            distributed_timeout_minutes=timeout.total_seconds() / 60,
        )
    # Megatron-LM's _set_random_seed: the RNG tracker's states must exist before any weight is
    # initialised (initialisation forks them), on GPU and, through compat, on CPU.
    seed_all(cfg.train.seed)
    return env


def _bracket(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


def destroy() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
