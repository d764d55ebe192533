"""launchers/slurm/pretrain.sbatch on a REAL single-host Slurm cluster.

tests/launchers/cluster.sh brings up slurmctld + 2 slurmd (nodes n1, n2) from
Debian's packages (installed on demand; needs root). Outside CI the tests are
skipped when that is impossible; with CI=true that is a failure.

The training entry point is the stand-in tests/launchers/fake_train.py (a real
2-process gloo rendezvous, SIGUSR1/SIGTERM -> checkpoint + exit 75), which
starts in a second and lets these tests probe the launcher's protocol (signal
routes, time-limit warning, scancel, failure report) quickly. The same launcher
with the real entry point (python -m megatron_elastic.train) is tested in
tests/test_launchers.py.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

import slurm_utils as su

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

NODES = 2
SBATCH_2x1 = [f"--nodes={NODES}", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=5"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from su.cluster_for_tests(tmp_path_factory, nodes=NODES, cpus=2)


def launch_env(run_dir: Path, **extra) -> dict[str, str]:
    env = {
        "RUN_DIR": str(run_dir),
        "PROJECT_DIR": str(su.REPO_ROOT),
        "PYTHON": sys.executable,
        "ENTRYPOINT": str(su.FAKE_TRAIN),
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def read_steps(run_dir: Path, rank: int) -> list[tuple[int, int]]:
    """[(restart, step), ...] written by fake_train."""
    p = run_dir / f"steps-rank{rank}.txt"
    if not p.exists():
        return []
    return [tuple(map(int, line.split())) for line in p.read_text().splitlines() if line.strip()]


def test_cluster_nodes_idle(cluster):
    nodes = cluster.nodes()
    assert sorted(nodes) == ["n1", "n2"], nodes
    assert set(nodes.values()) <= {"idle", "mix", "alloc"}, nodes


def test_two_node_run(cluster, tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    job = cluster.submit(su.PRETRAIN_SBATCH, ["configs/smoke.yaml", "fake.steps=3"],
                         sbatch_args=SBATCH_2x1, env=launch_env(run_dir), cwd=tmp_path)
    info = cluster.wait(job, timeout=90)
    print(f"2-node job {job} finished in {time.monotonic() - t0:.1f}s")
    why = lambda: cluster.describe_job(job, info, run_dir)  # noqa: E731
    assert info["JobState"] == "COMPLETED", why()
    assert su.exit_code(info) == (0, 0), why()
    assert info["Restarts"] == "0", why()

    # Per-rank logs, each line labelled with the rank ("R: ...").
    logs = su.rank_logs(run_dir, job)
    assert sorted(logs) == [0, 1], why()
    for r, text in logs.items():
        lines = [ln for ln in text.splitlines() if ln.strip()]
        assert lines and all(ln.startswith(f"{r}: ") for ln in lines), f"rank {r}:\n{text}"
        assert f"fake_train rank {r}: done at step 3" in text, why()
    statuses = su.rank_exit_statuses(run_dir, job)
    assert {r: s["rc"] for r, s in statuses.items()} == {0: "0", 1: "0"}, statuses

    # The rendezvous env each rank saw (and a real gloo all_reduce over it).
    seen = {r: json.loads((run_dir / f"rendezvous-rank{r}.json").read_text()) for r in (0, 1)}
    for r, s in seen.items():
        assert s["RANK"] == str(r) and s["WORLD_SIZE"] == "2", s
        assert s["LOCAL_RANK"] == "0" and s["LOCAL_WORLD_SIZE"] == "1", s
        assert s["allreduce"] == 1.0, s
        assert s["config"] == "configs/smoke.yaml", s
        assert s["overrides"]["fake.steps"] == "3", s
        ckpt = str(run_dir / "checkpoints")
        assert s["overrides"]["checkpoint.save"] == ckpt == s["overrides"]["checkpoint.load"], s
    assert {s["SLURM_NODEID"] for s in seen.values()} == {"0", "1"}, seen
    assert {s["SLURMD_NODENAME"] for s in seen.values()} == {"n1", "n2"}, seen
    assert seen[0]["MASTER_ADDR"] == seen[1]["MASTER_ADDR"] == "127.0.0.1", seen
    assert seen[0]["MASTER_PORT"] == seen[1]["MASTER_PORT"] == str(20000 + int(job) % 20000), seen
    assert read_steps(run_dir, 0) == [(0, 1), (0, 2), (0, 3)]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "3"


def test_preempt_signal_requeues_and_resumes(cluster, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@120 does before the time
    limit): forwarded to all ranks, checkpoint + exit 75, scontrol requeue,
    the restarted job resumes from the checkpoint and finishes with 0."""
    run_dir = tmp_path / "run"
    steps = 40
    job = cluster.submit(su.PRETRAIN_SBATCH,
                         ["configs/smoke.yaml", f"fake.steps={steps}", "fake.step_time=0.25"],
                         sbatch_args=SBATCH_2x1, env=launch_env(run_dir), cwd=tmp_path)
    su.wait_for(lambda: len(read_steps(run_dir, 0)) >= 3, 60, "3 training steps",
                on_timeout=lambda: cluster.describe_job(job, run_dir=run_dir))
    t0 = time.monotonic()
    cluster.scancel(job, signal="USR1", batch=True)
    cluster.wait_state(job, {"PENDING"}, timeout=30)
    t_requeued = time.monotonic() - t0
    info = cluster.wait(job, timeout=120)
    print(f"job {job}: signal -> requeued {t_requeued:.1f}s, -> finished {time.monotonic() - t0:.1f}s")
    why = lambda: cluster.describe_job(job, info, run_dir)  # noqa: E731
    assert info["JobState"] == "COMPLETED", why()
    assert su.exit_code(info) == (0, 0), why()
    assert info["Restarts"] == "1", why()

    # First run stopped at step k (checkpoint), second run did k+1..steps.
    progress = (run_dir / "progress").read_text()
    k = int(progress.split("step=")[1].split()[0])
    assert progress.startswith("preempted restart=0"), progress
    assert 3 <= k < steps, progress
    for r in (0, 1):
        got = read_steps(run_dir, r)
        expected = [(0, s) for s in range(1, k + 1)] + [(1, s) for s in range(k + 1, steps + 1)]
        assert got == expected, f"rank {r}: {got}\n{why()}"
        sigs = (run_dir / f"signals-rank{r}.txt").read_text()
        assert "SIGUSR1" in sigs and "SIGTERM" not in sigs, sigs
    log = cluster.job_stdout(job, info)
    assert "got SIGUSR1: forwarding to srun" in log, log
    assert f"scontrol requeue {job}" in log, log
    assert "restart=1]" in log and "all 2 ranks finished successfully" in log, log
    logs = su.rank_logs(run_dir, job)
    assert "resuming from step" in logs[1] and f"exit code {su.REQUEUE_EXIT_CODE}" in logs[1], logs[1]


def test_failing_rank_is_reported(cluster, tmp_path):
    run_dir = tmp_path / "run"
    job = cluster.submit(su.PRETRAIN_SBATCH,
                         ["configs/smoke.yaml", "fake.steps=50", "fake.fail_rank=1",
                          "fake.fail_step=2", "fake.fail_code=7"],
                         sbatch_args=SBATCH_2x1, env=launch_env(run_dir), cwd=tmp_path)
    info = cluster.wait(job, timeout=90)
    why = lambda: cluster.describe_job(job, info, run_dir)  # noqa: E731
    assert info["JobState"] == "FAILED", why()
    assert su.exit_code(info)[0] != 0, why()
    assert info["Restarts"] == "0", why()
    log = cluster.job_stdout(job, info)
    assert "first failure: rank 1 on node n2 (SLURM_NODEID=1), exit code 7" in log, log
    assert "injected failure" in log, log  # tail of the failing rank's log


def test_scancel_is_not_requeued(cluster, tmp_path):
    """A plain scancel (SIGTERM): ranks checkpoint and exit 75, but the job
    stays cancelled (the script must not undo a user's scancel)."""
    run_dir = tmp_path / "run"
    job = cluster.submit(su.PRETRAIN_SBATCH,
                         ["configs/smoke.yaml", "fake.steps=200", "fake.step_time=0.25"],
                         sbatch_args=SBATCH_2x1, env=launch_env(run_dir), cwd=tmp_path)
    su.wait_for(lambda: len(read_steps(run_dir, 0)) >= 2, 60, "2 training steps",
                on_timeout=lambda: cluster.describe_job(job, run_dir=run_dir))
    cluster.scancel(job)
    info = cluster.wait(job, timeout=60)
    why = lambda: cluster.describe_job(job, info, run_dir)  # noqa: E731
    assert info["JobState"] == "CANCELLED", why()
    assert info["Restarts"] == "0", why()
    time.sleep(1)  # the batch script may still be writing its last lines
    assert "not requeueing" in cluster.job_stdout(job, info), why()
    assert (run_dir / "checkpoints" / "latest").exists(), why()


def test_time_limit_warning_requeues(cluster, tmp_path):
    """The real trigger: --signal=B:USR1@N before the time limit (here 1 min
    limit, warning at 55 s; slurmctld checks limits only every ~30 s, so the
    signal comes 5..35 s after the start). The job must requeue itself."""
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    job = cluster.submit(su.PRETRAIN_SBATCH,
                         ["configs/smoke.yaml", "fake.steps=100000", "fake.step_time=0.25"],
                         sbatch_args=[*SBATCH_2x1, "--time=1", "--signal=B:USR1@55"],
                         env=launch_env(run_dir), cwd=tmp_path)
    try:
        su.wait_for(lambda: (cluster.job_info(job) or {}).get("Restarts") == "1", 90,
                    "the time-limit warning to requeue the job",
                    on_timeout=lambda: cluster.describe_job(job, run_dir=run_dir))
        print(f"job {job}: requeued by the time-limit warning after {time.monotonic() - t0:.1f}s")
    finally:
        cluster.scancel(job)
    info = cluster.wait(job, timeout=60)
    log = cluster.job_stdout(job, info)
    assert "got SIGUSR1: forwarding to srun" in log, log
    assert f"scontrol requeue {job}" in log, log
    assert (run_dir / "progress").read_text().startswith("preempted restart=0"), log
