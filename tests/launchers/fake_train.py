"""Stand-in for the training entry point, used by the Slurm launcher tests.

Usage (what launchers/slurm/pretrain.sbatch runs on every rank):

    python tests/launchers/fake_train.py --config CONFIG.yaml [key=value ...]

It follows the same contract as the real entry point (megatron_elastic.train):

* rank/world from the torchrun-style env: RANK, WORLD_SIZE, LOCAL_RANK,
  LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT; a real gloo process group is
  formed over them and an all_reduce proves the rendezvous env is right;
* ``checkpoint.load=DIR`` / ``checkpoint.save=DIR`` overrides (names are taken
  from $LOAD_ARG / $SAVE_ARG if set); resumes from DIR/latest if present;
* SIGUSR1 / SIGTERM: finish the current step, all ranks agree (all_reduce) to
  stop, save a checkpoint, write the ``progress`` marker and exit 75
  ("requeue me"); handlers are idempotent (a signal may arrive twice);
* otherwise runs ``fake.steps`` steps and exits 0.

Knobs (overrides): fake.steps (default 5), fake.step_time (s, default 0.2),
fake.fail_rank / fake.fail_step / fake.fail_code (inject a failure).
Files under $RUN_DIR: steps-rank{R}.txt ("<restart> <step>" per step),
signals-rank{R}.txt (signals received), progress (preemption marker),
rendezvous-rank{R}.json (what this rank saw).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time

REQUEUE_EXIT_CODE = 75

_stop_requested = False
_signals_file: str | None = None


def _on_signal(signum, frame):  # idempotent: only sets a flag (+ a note)
    global _stop_requested
    _stop_requested = True
    if _signals_file:
        with open(_signals_file, "a") as f:
            f.write(f"{signal.Signals(signum).name} {time.time():.3f}\n")


def parse_overrides(argv: list[str]) -> tuple[str | None, dict[str, str]]:
    config = None
    overrides: dict[str, str] = {}
    argv = list(argv)
    if argv[:1] == ["--config"] and len(argv) > 1:
        config, argv = argv[1], argv[2:]
    for arg in argv:
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif "=" in arg:
            key, value = arg.split("=", 1)
            overrides[key] = value
        elif config is None:
            config = arg
        else:
            raise SystemExit(f"fake_train: unexpected argument {arg!r}")
    return config, overrides


def main(argv: list[str]) -> int:
    global _signals_file
    # Install handlers before the slow torch import.
    signal.signal(signal.SIGUSR1, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    config, ov = parse_overrides(argv)
    save_key = os.environ.get("SAVE_ARG", "checkpoint.save=").rstrip("=")
    load_key = os.environ.get("LOAD_ARG", "checkpoint.load=").rstrip("=")
    save_dir = ov.get(save_key)
    load_dir = ov.get(load_key)
    steps = int(ov.get("fake.steps", 5))
    step_time = float(ov.get("fake.step_time", 0.2))
    fail_rank = int(ov.get("fake.fail_rank", -1))
    fail_step = int(ov.get("fake.fail_step", 1))
    fail_code = int(ov.get("fake.fail_code", 3))

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    run_dir = os.environ.get("RUN_DIR") or save_dir or "."
    os.makedirs(run_dir, exist_ok=True)
    _signals_file = os.path.join(run_dir, f"signals-rank{rank}.txt")

    info = {
        k: os.environ.get(k)
        for k in (
            "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
            "MASTER_PORT", "SLURM_NODEID", "SLURMD_NODENAME", "SLURM_PROCID",
            "SLURM_JOB_ID", "SLURM_RESTART_COUNT",
        )
    }
    info["config"] = config
    info["overrides"] = ov
    print("fake_train start " + " ".join(f"{k}={v}" for k, v in info.items()), flush=True)

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    expected = world * (world - 1) / 2
    info["allreduce"] = t.item()
    with open(os.path.join(run_dir, f"rendezvous-rank{rank}.json"), "w") as f:
        json.dump(info, f)
    if t.item() != expected:
        print(f"fake_train: all_reduce gave {t.item()}, expected {expected}", flush=True)
        return 2
    print(f"fake_train rank {rank}: all_reduce ok ({t.item()})", flush=True)

    start = 0
    if load_dir and os.path.exists(os.path.join(load_dir, "latest")):
        with open(os.path.join(load_dir, "latest")) as f:
            start = int(f.read().strip())
        print(f"fake_train rank {rank}: resuming from step {start}", flush=True)

    steps_file = os.path.join(run_dir, f"steps-rank{rank}.txt")
    step = start
    flag = torch.zeros(1)
    while step < steps:
        time.sleep(step_time)
        step += 1
        with open(steps_file, "a") as f:
            f.write(f"{restart} {step}\n")
        print(f"fake_train rank {rank}: step {step}/{steps}", flush=True)
        if rank == fail_rank and step == fail_step:
            print(f"fake_train rank {rank}: injected failure, exit {fail_code}", flush=True)
            os._exit(fail_code)
        # All ranks must agree to stop at the same step (signals arrive skewed).
        flag.fill_(1.0 if _stop_requested else 0.0)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            break

    def save(at: int) -> None:
        if save_dir and rank == 0:
            os.makedirs(save_dir, exist_ok=True)
            tmp = os.path.join(save_dir, "latest.tmp")
            with open(tmp, "w") as f:
                f.write(f"{at}\n")
            os.replace(tmp, os.path.join(save_dir, "latest"))
        dist.barrier()  # checkpoint complete on all ranks before anyone exits

    if step < steps:  # stop requested
        save(step)
        if rank == 0:
            with open(os.path.join(run_dir, "progress"), "a") as f:
                f.write(f"preempted restart={restart} step={step}\n")
        print(f"fake_train rank {rank}: checkpoint at step {step}, exit {REQUEUE_EXIT_CODE}",
              flush=True)
        dist.destroy_process_group()
        return REQUEUE_EXIT_CODE

    save(step)
    dist.destroy_process_group()
    print(f"fake_train rank {rank}: done at step {step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
