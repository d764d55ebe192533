"""parallel.read_dist_env and collective_timeout: which environment variables decide rank, world
size, local rank and the rendezvous address under torchrun, under SLURM's srun, and alone."""

from __future__ import annotations

from datetime import timedelta

import pytest

from megatron_elastic.config import Config, ConfigError
from megatron_elastic.parallel import DistEnv, RendezvousError, _bracket, collective_timeout, read_dist_env

VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
             "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MEGATRON_ELASTIC_TIMEOUT_S")


@pytest.fixture
def env(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))

    return set_env


def test_torchrun(env):
    env(RANK=5, WORLD_SIZE=8, LOCAL_RANK=1, MASTER_ADDR="node0", MASTER_PORT=29500)
    assert read_dist_env() == DistEnv(rank=5, world_size=8, local_rank=1, master_addr="node0", master_port=29500)


def test_slurm(env):
    env(SLURM_PROCID=6, SLURM_NTASKS=16, SLURM_LOCALID=2, MASTER_ADDR="10.0.0.7", MASTER_PORT=6000)
    assert read_dist_env() == DistEnv(6, 16, 2, "10.0.0.7", 6000)


def test_torchrun_variables_win_over_slurm(env):
    """torchrun started inside an allocation: SLURM describes the allocation, not this process."""
    env(RANK=1, WORLD_SIZE=2, LOCAL_RANK=1, SLURM_PROCID=0, SLURM_NTASKS=1, SLURM_LOCALID=0, MASTER_PORT=1234)
    assert read_dist_env() == DistEnv(1, 2, 1, "127.0.0.1", 1234)


def test_single_process_needs_nothing(env):
    found = read_dist_env()
    assert (found.rank, found.world_size, found.local_rank, found.master_addr) == (0, 1, 0, "127.0.0.1")
    assert 0 < found.master_port < 65536  # a free port picked for the one-process group


@pytest.mark.parametrize("variables", [
    {"RANK": 0, "WORLD_SIZE": 2, "MASTER_ADDR": "node0"},
    {"SLURM_PROCID": 3, "SLURM_NTASKS": 4},
])
def test_missing_master_port_in_a_multi_process_run(env, variables):
    env(**variables)
    with pytest.raises(RendezvousError, match="MASTER_PORT is not set for a multi-process run: launch with "
                                              "torchrun or launchers/slurm/pretrain.sbatch"):
        read_dist_env()


def test_collective_timeout(env):
    cfg = Config().apply_overrides(["parallel.distributed_timeout_minutes=0.25"])
    assert collective_timeout(cfg) == timedelta(seconds=15)
    env(MEGATRON_ELASTIC_TIMEOUT_S="2.5")  # the environment wins
    assert collective_timeout(cfg) == timedelta(seconds=2.5)
    for bad in ("0", "-1", "soon"):
        env(MEGATRON_ELASTIC_TIMEOUT_S=bad)
        with pytest.raises(ConfigError, match="must be a positive number of seconds"):
            collective_timeout(cfg)


def test_ipv6_master_addresses_are_bracketed_for_the_tcp_url():
    assert _bracket("::1") == "[::1]"
    assert _bracket("[::1]") == "[::1]"
    assert _bracket("node0") == "node0" and _bracket("10.0.0.1") == "10.0.0.1"
