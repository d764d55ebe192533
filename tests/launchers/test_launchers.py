"""The launchers with the REAL training entry point (python -m megatron_elastic.train).

* Slurm (launchers/slurm/pretrain.sbatch on the single-host test cluster of
  tests/launchers/cluster.sh, 2 nodes x 1 CPU rank): a short run, and a preemption
  (`scancel --batch --signal=USR1`) -> checkpoint -> requeue -> resume whose loss
  trajectory must equal an uninterrupted run's, printed to 6 decimals.
* Outside Slurm (launchers/local.sh -n 2, i.e. torchrun): SIGTERM mid-run -> exit 75 +
  checkpoint; the rerun resumes and again reproduces the uninterrupted trajectory.
* The entry point's environment checks: one clear `error [rank N]: ...` line and exit code 2.

Every run is configs/smoke.yaml shrunk by helpers.tiny_overrides (a model of ~50k parameters),
world size 2 with expert parallelism 2. The uninterrupted reference is computed once per module.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, free_port, tiny_overrides

import slurm_utils as su

LOCAL_SH = REPO / "launchers" / "local.sh"
CONFIG = "configs/smoke.yaml"
# Long enough that a signal sent after iteration SIGNAL_AFTER arrives well before the end (an
# iteration of the tiny model takes ~0.05 s), short enough to keep a run at about half a minute on
# 2 cores. The signal comes after a periodic save (SAVE_INTERVAL): a preemption save must work in
# a process that has saved before (it once did not: Megatron's writer keeps a helper process that
# a process-group signal used to kill).
LONG_ITERS = 80
SAVE_INTERVAL = 10
SIGNAL_AFTER = SAVE_INTERVAL + 1
ITER_RE = re.compile(r"iter\s+(\d+)/(\d+) \| loss (\S+)")
SBATCH_2x1 = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10"]


# ----------------------------------------------------------------------------- helpers
def long_overrides(data: dict, run_dir: Path) -> list:
    """The run that gets interrupted, and its uninterrupted reference (identical config)."""
    ckpt = run_dir / "checkpoints"
    return tiny_overrides(data, run_dir, **{
        "parallel.expert_model_parallel_size": 2,
        "train.train_iters": LONG_ITERS,
        "logging.log_interval": 1,
        "checkpoint.save": ckpt,
        "checkpoint.load": ckpt,
        "checkpoint.save_interval": SAVE_INTERVAL,
    })


def losses(*texts: str) -> dict:
    """{iteration: loss as printed} from `iter K/T | loss X` lines; an iteration seen twice
    must have the same loss (a resumed run may never re-run a step differently)."""
    out: dict = {}
    for text in texts:
        for m in ITER_RE.finditer(text):
            it, loss = int(m.group(1)), m.group(3)
            assert out.setdefault(it, loss) == loss, f"iteration {it}: {out[it]} vs {loss}"
    return out


def runner_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_local(nproc: int, overrides: list, log: Path, **env) -> subprocess.Popen:
    """launchers/local.sh in its own session (so a test can signal its process group)."""
    f = open(log, "ab")
    try:
        return subprocess.Popen(
            ["bash", str(LOCAL_SH), "-n", str(nproc), CONFIG, *map(str, overrides)],
            cwd=REPO, env=runner_env(**env), stdout=f, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        f.close()


def wait_proc(proc: subprocess.Popen, timeout: float, log: Path) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"launcher did not finish within {timeout}s:\n{su.tail(log.read_text(), 60)}")


def run_local(nproc: int, overrides: list, log: Path, timeout: float = 240, **env) -> tuple[int, str]:
    rc = wait_proc(start_local(nproc, overrides, log, **env), timeout, log)
    return rc, log.read_text(errors="replace")


def entry_point(overrides: list, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    """One rank of `python -m megatron_elastic.train` with a given rank environment."""
    base = runner_env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
              "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        base.pop(k, None)
    base.update({k: str(v) for k, v in env.items()})
    return subprocess.run(
        [sys.executable, "-m", "megatron_elastic.train", "--config", CONFIG, *map(str, overrides)],
        cwd=REPO, env=base, capture_output=True, text=True, timeout=timeout,
    )


def assert_checkpoint(ckpt: Path, iteration: int) -> None:
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    assert tracker.is_file(), sorted(p.name for p in ckpt.iterdir()) if ckpt.is_dir() else ckpt
    assert int(tracker.read_text().strip()) == iteration
    assert (ckpt / f"iter_{iteration:07d}").is_dir()


@pytest.fixture(scope="module")
def reference(smoke_data, tmp_path_factory) -> dict:
    """Losses of the uninterrupted LONG_ITERS run: 2 ranks under torchrun, EP 2."""
    run_dir = tmp_path_factory.mktemp("reference")
    log = run_dir / "local.log"
    t0 = time.monotonic()
    rc, out = run_local(2, long_overrides(smoke_data, run_dir), log)
    print(f"reference run: {time.monotonic() - t0:.1f}s")
    assert rc == 0, su.tail(out, 60)
    got = losses(out)
    assert sorted(got) == list(range(1, LONG_ITERS + 1)), su.tail(out, 60)
    return got


# ----------------------------------------------------------------------------- Slurm
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from su.cluster_for_tests(tmp_path_factory, nodes=2, cpus=2)


def slurm_env(run_dir: Path) -> dict:
    return {
        "RUN_DIR": str(run_dir),
        "PROJECT_DIR": str(REPO),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
    }


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_two_node_training(cluster, smoke_data, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(smoke_data, run_dir, **{
        "parallel.expert_model_parallel_size": 2,
        "checkpoint.save_interval": 2,
        "train.train_iters": 8,
    })
    t0 = time.monotonic()
    job = cluster.submit(su.PRETRAIN_SBATCH, [CONFIG, *overrides], sbatch_args=SBATCH_2x1,
                         env=slurm_env(run_dir), cwd=tmp_path)
    info = cluster.wait(job, timeout=240)
    print(f"2-node job {job}: {time.monotonic() - t0:.1f}s")
    why = lambda: cluster.describe_job(job, info, run_dir)  # noqa: E731
    assert info["JobState"] == "COMPLETED", why()
    assert su.exit_code(info) == (0, 0), why()
    assert info["Restarts"] == "0", why()
    logs = su.rank_logs(run_dir, job)
    assert sorted(logs) == [0, 1], why()
    got = losses(logs[0])
    assert sorted(got) == list(range(1, 9)), why()
    assert all(line.startswith("0: ") for line in logs[0].splitlines() if ITER_RE.search(line))
    assert "world 2 (tp 1, pp 1, ep 2, dp 2)" in logs[0], why()
    assert "final validation loss" in logs[0], why()
    assert not ITER_RE.search(logs[1]), "only rank 0 prints the progress line"
    ckpt = run_dir / "checkpoints"  # the sbatch's default CKPT_DIR (its override wins)
    assert_checkpoint(ckpt, 8)
    assert all((ckpt / f"iter_{i:07d}").is_dir() for i in (2, 4, 6)), sorted(os.listdir(ckpt))
    assert {r: s["rc"] for r, s in su.rank_exit_statuses(run_dir, job).items()} == {0: "0", 1: "0"}


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_preemption_resumes_exactly(cluster, smoke_data, reference, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@120 does before the time limit) ->
    every rank checkpoints at the same step N and exits 75 -> scontrol requeue -> the
    requeued job resumes at N and the combined trajectory equals the uninterrupted one."""
    run_dir = tmp_path / "run"
    job = cluster.submit(su.PRETRAIN_SBATCH, [CONFIG, *long_overrides(smoke_data, run_dir)],
                         sbatch_args=SBATCH_2x1, env=slurm_env(run_dir), cwd=tmp_path)

    def progressed():
        text = su.rank_logs(run_dir, job).get(0, "")
        return any(int(m.group(1)) >= SIGNAL_AFTER for m in ITER_RE.finditer(text))

    su.wait_for(progressed, 180, f"iteration {SIGNAL_AFTER} in the rank-0 log",
                on_timeout=lambda: cluster.describe_job(job, run_dir=run_dir))
    t0 = time.monotonic()
    cluster.scancel(job, signal="USR1", batch=True)
    info = cluster.wait(job, timeout=300)
    print(f"job {job}: signal -> finished after requeue in {time.monotonic() - t0:.1f}s")
    why = lambda: cluster.describe_job(job, info, run_dir)  # noqa: E731
    assert info["JobState"] == "COMPLETED", why()
    assert su.exit_code(info) == (0, 0), why()
    assert info["Restarts"] == "1", why()

    log0 = su.rank_logs(run_dir, job)[0]  # appended across the requeue
    stop = re.search(r"stopping at iteration (\d+) on signal \(exit 75\)", log0)
    assert stop, why()
    n = int(stop.group(1))
    assert SIGNAL_AFTER <= n < LONG_ITERS, why()
    assert f"saved checkpoint at iteration {n} to {run_dir / 'checkpoints' / f'iter_{n:07d}'}" in log0
    ckpt = run_dir / "checkpoints"
    assert f"resumed from {ckpt} at iteration {n}" in log0, why()
    assert "=== rank=0 exit code 75" in log0 and "restart=1" in log0, why()
    first, second = log0.split(f"resumed from {ckpt} at iteration {n}", 1)
    assert sorted(losses(first)) == list(range(1, n + 1)), why()
    assert sorted(losses(second)) == list(range(n + 1, LONG_ITERS + 1)), why()
    assert losses(log0) == reference
    assert_checkpoint(ckpt, LONG_ITERS)
    job_log = cluster.job_stdout(job, info)
    assert f"scontrol requeue {job}" in job_log and "all 2 ranks finished successfully" in job_log


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_environment_error_is_reported(cluster, smoke_data, tmp_path):
    """A rank failing its environment check: the job fails, the batch log names the rank and
    node, exit code 2, and shows the rank's one-line error."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(smoke_data, run_dir, **{"parallel.expert_model_parallel_size": 4})
    job = cluster.submit(su.PRETRAIN_SBATCH, [CONFIG, *overrides], sbatch_args=SBATCH_2x1,
                         env=slurm_env(run_dir), cwd=tmp_path)
    info = cluster.wait(job, timeout=180)
    why = lambda: cluster.describe_job(job, info, run_dir)  # noqa: E731
    assert info["JobState"] == "FAILED", why()
    assert info["Restarts"] == "0", why()
    time.sleep(1)  # the batch script may still be writing its report
    log = cluster.job_stdout(job, info)
    assert re.search(r"first failure: rank [01] on node n[12] \(SLURM_NODEID=[01]\), exit code 2", log), log
    assert re.search(r"error \[rank [01]\]: world size 2 is not divisible by expert", log), log


# ----------------------------------------------------------------------------- torchrun
def descendants(pid: int) -> list:
    children: dict = {}
    for line in subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True,
                               text=True).stdout.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@pytest.mark.multiproc
@pytest.mark.slow
def test_local_sigterm_checkpoints_and_resumes_exactly(smoke_data, reference, tmp_path):
    """SIGTERM to EVERY process of the run at once (local.sh, the torchrun agent, the rank
    wrappers, the ranks and their helper processes), as a cgroup-wide stop sends it: each rank
    gets it up to three times (directly, from torchrun, from local.sh), saves once at the same
    step N and exits 75; torchrun exits 1 but local.sh exits 75. The rerun resumes at N and the
    trajectory equals the uninterrupted one."""
    run_dir = tmp_path / "run"
    overrides = long_overrides(smoke_data, run_dir)
    log1 = run_dir / "first.log"
    run_dir.mkdir()
    proc = start_local(2, overrides, log1)

    def progressed():
        if proc.poll() is not None:
            return True
        return any(int(m.group(1)) >= SIGNAL_AFTER for m in ITER_RE.finditer(log1.read_text()))

    su.wait_for(progressed, 180, f"iteration {SIGNAL_AFTER}",
                on_timeout=lambda: su.tail(log1.read_text(), 40))
    assert proc.poll() is None, su.tail(log1.read_text(), 60)
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    rc = wait_proc(proc, 180, log1)
    out1 = log1.read_text(errors="replace")
    assert rc == 75, su.tail(out1, 60)
    stop = re.search(r"stopping at iteration (\d+) on signal \(exit 75\)", out1)
    assert stop, su.tail(out1, 60)
    n = int(stop.group(1))
    assert SIGNAL_AFTER <= n < LONG_ITERS
    ckpt = run_dir / "checkpoints"
    assert_checkpoint(ckpt, n)
    assert "all ranks stopped after saving a checkpoint: exit 75" in out1
    assert sorted(losses(out1)) == list(range(1, n + 1))

    rc, out2 = run_local(2, overrides, run_dir / "second.log")
    assert rc == 0, su.tail(out2, 60)
    assert f"resumed from {ckpt} at iteration {n}" in out2, su.tail(out2, 60)
    assert sorted(losses(out2)) == list(range(n + 1, LONG_ITERS + 1))
    assert losses(out1, out2) == reference
    assert_checkpoint(ckpt, LONG_ITERS)


# ----------------------------------------------------------------------------- environment checks
@pytest.mark.multiproc
@pytest.mark.slow
def test_world_size_mismatch(smoke_data, tmp_path):
    """2 ranks with expert_model_parallel_size=4: every rank refuses with the fix in the message,
    and local.sh passes the ranks' exit code 2 through (torchrun alone would say 1)."""
    overrides = tiny_overrides(smoke_data, tmp_path, **{"parallel.expert_model_parallel_size": 4})
    rc, out = run_local(2, overrides, tmp_path / "local.log", timeout=180)
    assert rc == 2, su.tail(out, 60)
    for rank in (0, 1):
        assert (f"error [rank {rank}]: world size 2 is not divisible by expert x expert-tensor x "
                f"pipeline parallel size = 4: launch a multiple of 4 processes") in out, su.tail(out, 60)
    # local.sh repeats the first failing rank's error line once, in its report, and torchrun's
    # ChildFailedError traceback is gone.
    report = [line for line in out.splitlines() if "FAILED: rank" in line]
    assert len(report) == 1 and re.search(
        r"FAILED: rank [01] exited with 2 \(first to fail; torchrun exit 1\): error \[rank [01]\]: world "
        r"size 2 is not divisible", report[0]), su.tail(out, 60)
    assert "ChildFailedError" not in out and "Traceback (most recent call last)" not in out, su.tail(out, 60)


@pytest.mark.slow
def test_master_unreachable(smoke_data, tmp_path):
    """Rank 1 of 2 whose rank 0 never starts: it gives up after the timeout and names the
    address instead of hanging in the rendezvous for the process-group timeout."""
    port = free_port()  # closed: nothing listens on it
    overrides = tiny_overrides(smoke_data, tmp_path, **{"parallel.expert_model_parallel_size": 2})
    t0 = time.monotonic()
    proc = entry_point(overrides, {
        "RANK": 1, "WORLD_SIZE": 2, "LOCAL_RANK": 1, "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port, "MEGATRON_ELASTIC_MASTER_TIMEOUT": 3,
    })
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error [rank 1]: rank 1: cannot reach MASTER_ADDR=127.0.0.1:{port} within 3s" in proc.stderr
    assert elapsed < 120, elapsed


@pytest.mark.slow
def test_data_path_missing(smoke_data, tmp_path):
    missing = tmp_path / "nowhere" / "corpus_text_document"
    overrides = tiny_overrides(smoke_data, tmp_path, **{"data.data_path": f"[{missing}]"})
    proc = entry_point(overrides, {})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error [rank 0]: data.data_path: {missing}.bin not found on this node" in proc.stderr


@pytest.mark.slow
def test_checkpoint_dir_not_writable(smoke_data, tmp_path):
    # We run as root in CI, where chmod does not stop writes: a path under a regular file does.
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory\n")
    save = blocker / "checkpoints"
    overrides = tiny_overrides(smoke_data, tmp_path, **{"checkpoint.save": save})
    proc = entry_point(overrides, {})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error [rank 0]: checkpoint.save={save} is not writable on this node" in proc.stderr


@pytest.mark.multiproc
@pytest.mark.slow
def test_local_tensor_parallel_sequence_parallel_trains_saves_and_exports(smoke_data, tmp_path):
    """The command a new user types for TP on a laptop: local.sh -n 2 with TP 2 + sequence
    parallel trains, saves, and the Hugging Face export reads the TP-sharded checkpoint."""
    ckpt = tmp_path / "ckpt"
    overrides = tiny_overrides(smoke_data, tmp_path, **{
        "parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": "true",
        "train.train_iters": 3, "checkpoint.save": str(ckpt),
        "elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 2,
        "elastic.pool_ratio": 2.0, "elastic.router_loss_coeff": 1e-4})
    rc, out = run_local(2, overrides, tmp_path / "local.log", timeout=300)
    assert rc == 0, su.tail(out, 60)
    assert "(tp 2," in out and "saved checkpoint at iteration 3" in out
    proc = subprocess.run([sys.executable, "tools/convert_to_hf.py", "--load", str(ckpt), "--output",
                           str(tmp_path / "hf")], cwd=REPO, capture_output=True, text=True,
                          env=runner_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "hf" / "config.json").is_file()
    assert list((tmp_path / "hf").glob("*.safetensors"))
