"""Helpers to drive a (test) Slurm cluster from Python tests.

Used with tests/launchers/cluster.sh (a real single-host cluster) but written for
any cluster reachable through SLURM_CONF / the default config. There is no
slurmdbd (no sacct): job state and exit codes come from `scontrol show job -o`
(kept for MinJobAge seconds after the job ends).

    cluster = SlurmCluster.up("/tmp/slurm-test")
    job = cluster.submit(PRETRAIN_SBATCH, ["configs/smoke.yaml", "train.iters=5"],
                         sbatch_args=["--nodes=2", "--ntasks-per-node=1"],
                         env={"RUN_DIR": str(run_dir)}, cwd=tmp_path)
    info = cluster.wait(job, timeout=120)
    assert info["JobState"] == "COMPLETED" and exit_code(info) == (0, 0)
    logs = rank_logs(run_dir, job)
    cluster.down()
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO_ROOT / "tests" / "launchers" / "cluster.sh"
PRETRAIN_SBATCH = REPO_ROOT / "launchers" / "slurm" / "pretrain.sbatch"
FAKE_TRAIN = REPO_ROOT / "tests" / "launchers" / "fake_train.py"

# Exit code of the training entry point meaning "checkpoint saved, requeue me"
# (REQUEUE_EXIT_CODE in launchers/slurm/pretrain.sbatch).
REQUEUE_EXIT_CODE = 75

# Job states after which nothing more happens to the job (a requeued job goes
# back to PENDING instead, so it never shows one of these in between).
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT",
})


class SlurmError(RuntimeError):
    pass


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def why_cluster_unavailable() -> str | None:
    """None if tests/launchers/cluster.sh can be expected to work here, else why not."""
    if not os.uname().sysname == "Linux":
        return "the test Slurm cluster needs Linux"
    if os.geteuid() != 0:
        return "the test Slurm cluster needs root (slurmd runs as root)"
    have_slurm = all(shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
                     for b in ("slurmctld", "slurmd", "sinfo", "munged"))
    if not have_slurm and not shutil.which("apt-get"):
        return "slurm/munge are not installed and apt-get is unavailable"
    return None


def free_port_base(n: int, lo: int = 30000, hi: int = 60000, tries: int = 50) -> int:
    """A port p such that p .. p+n-1 are all free on 127.0.0.1 right now."""
    import random

    for _ in range(tries):
        base = random.randrange(lo, hi - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise SlurmError(f"no {n} consecutive free ports found")


def _run(cmd: list[str], env: Mapping[str, str] | None = None, timeout: float = 60,
         check: bool = True, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=dict(env) if env is not None else None, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise SlurmError(f"{' '.join(map(str, cmd))} failed with {proc.returncode}:\n"
                         f"{proc.stdout}\n{proc.stderr}")
    return proc


def parse_kv(text: str) -> dict[str, str]:
    """Parse `scontrol show ... -o` output (one record): first key wins.

    Values with spaces (Command=, Comment=) are truncated at the first space;
    use only simple fields (JobState, ExitCode, Restarts, Reason, StdOut, ...).
    """
    out: dict[str, str] = {}
    for tok in text.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            out.setdefault(k, v)
    return out


def exit_code(info: Mapping[str, str]) -> tuple[int, int]:
    """(exit code, signal) from a job record's ExitCode=RC:SIG."""
    rc, sig = info.get("ExitCode", "0:0").split(":")
    return int(rc), int(sig)


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             interval: float = 0.25, on_timeout: Callable[[], str] | None = None):
    """Poll predicate() until truthy; returns its value or raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = ("\n" + on_timeout()) if on_timeout else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


def job_log_dir(run_dir: str | os.PathLike, job_id: str | int) -> Path:
    """Per-rank logs directory of launchers/slurm/pretrain.sbatch."""
    return Path(run_dir) / "logs" / f"job-{job_id}"


def rank_logs(run_dir: str | os.PathLike, job_id: str | int) -> dict[int, str]:
    """{rank: text} of $RUN_DIR/logs/job-ID/rank-N.log."""
    out = {}
    for p in sorted(job_log_dir(run_dir, job_id).glob("rank-*.log")):
        m = re.fullmatch(r"rank-(\d+)\.log", p.name)
        if m:
            out[int(m.group(1))] = p.read_text(errors="replace")
    return out


def rank_exit_statuses(run_dir: str | os.PathLike, job_id: str | int) -> dict[int, dict[str, str]]:
    """{rank: {"rc":..., "node":..., "nodeid":..., "time":...}} of the last run."""
    out = {}
    for p in sorted(job_log_dir(run_dir, job_id).glob("rank-*.exit")):
        m = re.fullmatch(r"rank-(\d+)\.exit", p.name)
        if m:
            out[int(m.group(1))] = parse_kv(p.read_text())
    return out


def tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


@dataclass
class SlurmCluster:
    """A Slurm cluster addressed by its slurm.conf (SLURM_CONF)."""

    dir: Path
    conf: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    # -- lifecycle (tests/launchers/cluster.sh) ---------------------------------
    @classmethod
    def at(cls, dir: str | os.PathLike) -> "SlurmCluster":
        d = Path(dir).resolve()
        return cls(dir=d, conf=d / "slurm.conf")

    @classmethod
    def up(cls, dir: str | os.PathLike, *, nodes: int = 2, cpus: int = 2,
           port_base: int | None = None, timeout: float = 300) -> "SlurmCluster":
        """Start the single-host test cluster (installs Slurm if needed)."""
        c = cls.at(dir)
        env = dict(os.environ)
        env.update(SLURM_TEST_NODES=str(nodes), SLURM_TEST_CPUS=str(cpus))
        env["SLURM_TEST_PORT_BASE"] = str(port_base or free_port_base(nodes + 1))
        proc = _run(["bash", str(CLUSTER_SH), "up", str(c.dir)], env=env, timeout=timeout,
                    check=False)
        if proc.returncode != 0:
            raise SlurmError(f"cluster.sh up {c.dir} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
        return c

    def is_running(self) -> bool:
        """slurmctld of this cluster alive (by its pid file)?"""
        pid_file = self.dir / "run" / "slurmctld.pid"
        try:
            os.kill(int(pid_file.read_text().strip()), 0)
            return True
        except (OSError, ValueError):
            return False

    def down(self, timeout: float = 120) -> None:
        _run(["bash", str(CLUSTER_SH), "down", str(self.dir)], env=self.env(), timeout=timeout)

    def daemon_logs(self) -> str:
        return _run(["bash", str(CLUSTER_SH), "logs", str(self.dir)], env=self.env(),
                    check=False).stderr

    # -- environment / commands -------------------------------------------
    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        env.update(self.extra_env)
        if extra:
            env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return _run(list(cmd), env=self.env(), check=check, timeout=timeout)

    def nodes(self) -> dict[str, str]:
        """{node name: state} from sinfo."""
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t").stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    # -- jobs -----------------------------------------------------------------
    def submit(self, script: str | os.PathLike, args: Iterable[str] = (), *,
               sbatch_args: Iterable[str] = (), env: Mapping[str, str] | None = None,
               cwd: str | os.PathLike | None = None) -> str:
        """sbatch [sbatch_args] script [args]; env is added to the submit
        environment (sbatch exports it to the job). Returns the job id."""
        cmd = ["sbatch", "--parsable", *sbatch_args, str(script), *args]
        proc = _run(cmd, env=self.env(env), cwd=cwd, timeout=60)
        return proc.stdout.strip().split(";")[0]

    def job_info(self, job_id: str | int) -> dict[str, str] | None:
        """Parsed `scontrol show job -o ID`, None once the record is gone."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if proc.returncode != 0 or "JobId=" not in proc.stdout:
            return None
        return parse_kv(proc.stdout)

    def wait(self, job_id: str | int, timeout: float = 300, interval: float = 0.5) -> dict[str, str]:
        """Wait for a terminal job state (through requeues); returns the record."""
        last: dict[str, dict[str, str] | None] = {"info": None}

        def done():
            info = self.job_info(job_id)
            if info is None:
                raise SlurmError(f"job {job_id} unknown to slurmctld (purged? MinJobAge too short?)")
            last["info"] = info
            return info if info.get("JobState") in TERMINAL_STATES else None

        return wait_for(done, timeout, f"job {job_id} to finish", interval=interval,
                        on_timeout=lambda: self.describe_job(job_id, last["info"]))

    def wait_state(self, job_id: str | int, states: Iterable[str], timeout: float = 60) -> dict[str, str]:
        states = set(states)
        return wait_for(lambda: (i := self.job_info(job_id)) and i.get("JobState") in states and i,
                        timeout, f"job {job_id} to reach {sorted(states)}")

    def scancel(self, job_id: str | int, *, signal: str | None = None, batch: bool = False,
                full: bool = False) -> None:
        cmd = ["scancel"]
        if signal:
            cmd.append(f"--signal={signal}")
        if batch:
            cmd.append("--batch")
        if full:
            cmd.append("--full")
        self.run(*cmd, str(job_id))

    def job_stdout(self, job_id: str | int, info: Mapping[str, str] | None = None) -> str:
        """Text of the job's batch log (StdOut= of the job record)."""
        info = info or self.job_info(job_id) or {}
        path = info.get("StdOut")
        if path and os.path.exists(path):
            return Path(path).read_text(errors="replace")
        return f"<no job log at {path!r}>"

    def describe_job(self, job_id: str | int, info: Mapping[str, str] | None = None,
                     run_dir: str | os.PathLike | None = None) -> str:
        """Everything useful for an assertion message."""
        info = info or self.job_info(job_id)
        parts = [f"job {job_id}: " + (" ".join(f"{k}={info[k]}" for k in (
            "JobState", "Reason", "ExitCode", "Restarts", "NodeList") if k in info)
            if info else "<no record>")]
        parts.append("--- job log ---\n" + tail(self.job_stdout(job_id, info), 60))
        if run_dir is not None:
            for r, text in rank_logs(run_dir, job_id).items():
                parts.append(f"--- rank {r} log ---\n" + tail(text, 30))
        parts.append("--- squeue ---\n" + self.run("squeue", check=False).stdout)
        return "\n".join(parts)


def cluster_for_tests(tmp_path_factory, *, nodes: int = 2, cpus: int = 2):
    """Body of a pytest fixture: `yield from cluster_for_tests(tmp_path_factory)`.

    Brings up the single-host test cluster (installing Slurm if needed) in a fresh temporary
    directory, or reuses one already running in $SLURM_TEST_DIR (left running). Skips where
    that is impossible (not root, no Slurm and no apt-get) -- except with CI=true, where it
    fails: CI must run the Slurm tests.
    """
    import pytest

    reason = why_cluster_unavailable()
    if reason:
        if in_ci():
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    d = os.environ.get("SLURM_TEST_DIR") or str(tmp_path_factory.mktemp("slurm-cluster"))
    preexisting = SlurmCluster.at(d).is_running()
    t0 = time.monotonic()
    try:
        c = SlurmCluster.up(d, nodes=nodes, cpus=cpus)
    except (SlurmError, OSError, subprocess.TimeoutExpired) as e:
        # Root + apt available and it still fails: a real problem, never skip.
        pytest.fail(f"could not bring up the test Slurm cluster in {d}:\n{e}")
    print(f"slurm test cluster up in {time.monotonic() - t0:.1f}s at {d}")
    try:
        yield c
    finally:
        if not preexisting:
            c.down()
