"""Checkpoint reliability: durable saves, an interruption-proof swap, verified loads, retention.

* every file and directory of a save is fsynced before the rename that publishes it, the parent
  after it, and the tracker the same way;
* a re-save of an existing iteration interrupted at any step leaves a tracker that names a
  loadable checkpoint;
* a real trainer SIGKILLed (or SIGTERMed) at random moments of its saves always resumes from the
  tracker's iteration;
* a damaged checkpoint (missing / truncated / bit-flipped shard, missing common.pt, garbage
  tracker) fails the trainer and the tools with one line naming the directory, the file and the
  newest complete earlier checkpoint, and ``checkpoint.fallback_to_last_good`` resumes from it;
* ``checkpoint.keep_last`` retention; ``checkpoint.async_save`` refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, free_port, run_distributed, tiny_overrides, train_run

SMOKE = REPO / "configs" / "smoke.yaml"
TRACKER = "latest_checkpointed_iteration.txt"
VOCAB = 512


def _ckpt_overrides(data, tmp_path, root, **extra):
    return tiny_overrides(data, tmp_path, **{"checkpoint.save": str(root), "checkpoint.load": str(root),
                                             "checkpoint.save_interval": 1, **extra})


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if hasattr(v, "dtype") and v.is_floating_point()}


def _same(a, b):
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


# ------------------------------------------------------------------------------------- fsync
def _fsync_worker(rank, world_size, overrides, root):
    from megatron_elastic import parallel
    from megatron_elastic.config import load_config
    from megatron_elastic.models.gpt import build_model
    from megatron_elastic.training.checkpoint import CheckpointError, resolve_load_dir, save_checkpoint

    cfg = load_config(SMOKE, overrides)
    parallel.initialize(cfg)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst, *a, **k)

    try:
        model = build_model(cfg, VOCAB)
        out = {}
        for label in ("new", "resave"):  # a first save, then a re-save of the same iteration
            events.clear()
            os.fsync, os.replace = fsync, replace
            try:
                final = save_checkpoint(root, model, None, cfg, 7)
            finally:
                os.fsync, os.replace = real_fsync, real_replace
            out[label] = {"events": list(events),
                          "files": sorted(p.name for p in Path(final).iterdir()),
                          "final": os.path.realpath(final), "root": os.path.realpath(root)}
        out["default_manifest"] = json.loads((Path(final) / "manifest.json").read_text())
        # checkpoint.checksum=true adds a CRC32 per file, which catches a flipped byte.
        crc_root = Path(root).parent / "crc"
        cfg.checkpoint.checksum = True
        save_checkpoint(crc_root, model, None, cfg, 3)
        out["crc_manifest"] = json.loads((crc_root / "iter_0000003" / "manifest.json").read_text())
        out["flipped"] = _corrupt(crc_root, "flipped_byte", iteration=3)
        try:
            resolve_load_dir(crc_root)
            out["crc_error"] = None
        except CheckpointError as exc:
            out["crc_error"] = str(exc)
        return out
    finally:
        parallel.destroy()


def test_save_fsyncs_every_file_and_directory(smoke_data, tmp_path):
    root = tmp_path / "ckpt"
    (out,) = run_distributed(_fsync_worker, 1, tiny_overrides(smoke_data, tmp_path), str(root),
                             tmp_dir=tmp_path)
    for label in ("new", "resave"):
        rec = out[label]
        events, final, root_s = rec["events"], rec["final"], rec["root"]
        partial = final + ".partial"
        assert "manifest.json" in rec["files"] and "common.pt" in rec["files"], rec["files"]
        publish = events.index(("replace", partial, final))
        fsynced_before = {e[1] for e in events[:publish] if e[0] == "fsync"}
        # Every file of the checkpoint and the iteration directory itself, before the rename.
        for name in rec["files"]:
            assert f"{partial}/{name}" in fsynced_before, (label, name)
        assert partial in fsynced_before, label
        # The parent after the rename; the tracker's temp file before its rename, the parent after.
        assert ("fsync", root_s) in events[publish + 1:], label
        tmp = f"{root_s}/.{TRACKER}.tmp"
        tracker_publish = events.index(("replace", tmp, f"{root_s}/{TRACKER}"))
        assert tracker_publish > publish, label
        assert ("fsync", tmp) in events[:tracker_publish], label
        assert ("fsync", root_s) in events[tracker_publish + 1:], label
    # The re-save swapped the old copy aside and synced the parent between the two renames.
    resave = out["resave"]["events"]
    final = out["resave"]["final"]
    aside = resave.index(("replace", final, final + ".old"))
    assert ("fsync", out["resave"]["root"]) in resave[aside + 1:resave.index(("replace", final + ".partial", final))]
    assert not Path(final + ".old").exists() and not Path(final + ".partial").exists()
    assert (root / TRACKER).read_text() == "7\n"
    # Manifests: sizes by default, sizes and CRC32s with checkpoint.checksum=true.
    files = out["default_manifest"]["files"]
    assert out["default_manifest"]["checksum"] is None and all(set(e) == {"size"} for e in files.values())
    assert sorted(files) == sorted(set(out["new"]["files"]) - {"manifest.json"})
    crc = out["crc_manifest"]
    assert crc["checksum"] == "crc32" and all(set(e) == {"size", "crc32"} for e in crc["files"].values())
    assert out["crc_error"] is not None and out["flipped"] in out["crc_error"], out["crc_error"]
    assert "holds no complete earlier checkpoint below it" in out["crc_error"]


# --------------------------------------------------------------- interrupted re-save (the swap)
class InjectedFault(RuntimeError):
    pass


def _swap_fault_worker(rank, world_size, overrides, base, work):
    """Re-save iteration 2 over a complete iteration 2, crashing at the i-th filesystem step."""
    import torch
    from megatron.core import dist_checkpointing

    from megatron_elastic import parallel
    from megatron_elastic.config import load_config
    from megatron_elastic.models.gpt import build_model
    from megatron_elastic.training import checkpoint as ck

    cfg = load_config(SMOKE, overrides)
    parallel.initialize(cfg)
    base, work = Path(base), Path(work)
    try:
        model = build_model(cfg, VOCAB)
        ck.save_checkpoint(base, model, None, cfg, 2)
        old = _params(model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        new = _params(model)

        real = {"replace": os.replace, "rename": os.rename, "rmtree": shutil.rmtree, "fsync": os.fsync}
        real_save = dist_checkpointing.save
        state = {"armed": False, "calls": 0, "fail_at": None, "hit": None}

        def wrap(name):
            def fn(*args, **kwargs):
                if state["armed"]:
                    if state["calls"] == state["fail_at"]:
                        state["hit"] = f"{name}({', '.join(Path(str(a)).name for a in args[:2] if not isinstance(a, int))})"
                        state["calls"] += 1
                        raise InjectedFault(name)
                    state["calls"] += 1
                return real[name](*args, **kwargs)
            return fn

        def save_then_arm(*args, **kwargs):
            result = real_save(*args, **kwargs)
            state["armed"] = True  # from here on only the sealing, manifest and swap remain
            return result

        records = []
        for step in range(80):
            root = work / f"step{step}"
            shutil.copytree(base, root)
            state.update(armed=False, calls=0, fail_at=step, hit=None)
            os.replace, os.rename, shutil.rmtree, os.fsync = (wrap(n) for n in ("replace", "rename", "rmtree", "fsync"))
            dist_checkpointing.save = save_then_arm
            try:
                ck.save_checkpoint(root, model, None, cfg, 2)
                faulted = False
            except InjectedFault:
                faulted = True
            finally:
                os.replace, os.rename, shutil.rmtree, os.fsync = (real[n] for n in ("replace", "rename", "rmtree", "fsync"))
                dist_checkpointing.save = real_save
                state["armed"] = False
            # What a restarted run sees: the tracker names a directory that exists and verifies.
            tracked = ck.read_tracker(root)
            loaded_dir = ck.resolve_load_dir(root)
            fresh = build_model(cfg, VOCAB)
            iteration = ck.load_checkpoint(root, fresh, None, cfg)
            got = _params(fresh)
            records.append({
                "step": step, "faulted": faulted, "hit": state["hit"], "tracker": tracked,
                "dir": loaded_dir.name, "iteration": iteration,
                "content": "new" if _same(got, new) else "old" if _same(got, old) else "mixed",
                "listing": sorted(p.name for p in root.iterdir()),
            })
            # ... and the next save of that iteration repairs whatever the crash left.
            ck.save_checkpoint(root, model, None, cfg, 2)
            again = build_model(cfg, VOCAB)
            ck.load_checkpoint(root, again, None, cfg)
            records[-1]["after_resave"] = ("new" if _same(_params(again), new) else "other",
                                           sorted(p.name for p in root.iterdir()))
            if not faulted:
                break
        return records
    finally:
        parallel.destroy()


def test_resave_interrupted_at_every_step_keeps_a_loadable_tracker(smoke_data, tmp_path):
    (records,) = run_distributed(_swap_fault_worker, 1, tiny_overrides(smoke_data, tmp_path),
                                 str(tmp_path / "base"), str(tmp_path / "work"), tmp_dir=tmp_path)
    assert not records[-1]["faulted"], "the save never completed without a fault"
    faulted = [r for r in records if r["faulted"]]
    hits = [r["hit"] for r in faulted]
    # Every step of the swap was interrupted once: old aside, new in, tracker, delete the aside.
    for step in ("replace(iter_0000002, iter_0000002.old)", "replace(iter_0000002.partial, iter_0000002)",
                 "replace(.latest_checkpointed_iteration.txt.tmp, latest_checkpointed_iteration.txt)",
                 "rmtree(iter_0000002.old)"):
        assert step in hits, (step, hits)
    for r in records:
        assert r["tracker"] == 2 and r["iteration"] == 2, r
        assert r["content"] in ("old", "new"), r  # never a mixture of two saves
        assert r["after_resave"] == ("new", ["iter_0000002", TRACKER]), r
    # Crashing between the two renames of the swap leaves only the aside copy: it is loaded.
    between = faulted[hits.index("replace(iter_0000002.partial, iter_0000002)")]
    assert between["dir"] == "iter_0000002.old" and between["content"] == "old"
    assert "iter_0000002" not in between["listing"]
    # Once the new directory is in place it is what loads, whether or not the tracker was rewritten.
    after = faulted[hits.index("rmtree(iter_0000002.old)")]
    assert after["dir"] == "iter_0000002" and after["content"] == "new"
    assert records[-1]["content"] == "new" and records[-1]["listing"] == ["iter_0000002", TRACKER]


# ----------------------------------------------------------------- real processes, real signals
def _train_cmd(data, tmp_path, root, **extra):
    return [sys.executable, "-m", "megatron_elastic.train", "--config", str(SMOKE),
            *_ckpt_overrides(data, tmp_path, root, **{"train.train_iters": 200, **extra})]


def _start(cmd, log: Path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    env.pop("MASTER_PORT", None)
    f = open(log, "w")
    # Its own process group, so that _finish can reap what a SIGKILLed trainer leaves behind
    # (checkpoint writer workers outlive their parent; a scheduler would kill the job's cgroup).
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    proc._log_file = f  # closed by _finish
    return proc


def _finish(proc, timeout=120):
    try:
        return proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # nothing of the group left
            pass
        proc._log_file.close()


def _wait_for_save(proc, root: Path, after: int, log: Path, timeout=120.0) -> int:
    """Block until a save of an iteration > ``after`` is being written; return that iteration.

    A kill can leave ``iter_<tracker+1>.partial`` behind (it is removed when that iteration is
    saved again), so callers pass ``after`` >= the tracker's iteration + 1."""
    deadline = time.monotonic() + timeout
    pattern = re.compile(r"^iter_(\d+)\.partial$")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) early:\n{log.read_text()[-3000:]}")
        try:
            names = os.listdir(root)
        except FileNotFoundError:
            names = []
        for name in names:
            m = pattern.match(name)
            if m and int(m.group(1)) > after:
                return int(m.group(1))
        time.sleep(0.002)
    proc.kill()
    raise AssertionError(f"no save after iteration {after} within {timeout}s:\n{log.read_text()[-3000:]}")


def _last_saved(log: Path, default: int) -> int:
    saved = [int(m) for m in re.findall(r"saved checkpoint at iteration (\d+)", log.read_text())]
    return saved[-1] if saved else default


def _resumed_at(log: Path):
    m = re.search(r"resumed from \S+ at iteration (\d+)", log.read_text())
    return int(m.group(1)) if m else None


@pytest.mark.slow
def test_sigkill_during_saves_seed1234(smoke_data, tmp_path):
    """SIGKILL the trainer at random moments of its saves 5 times, then SIGTERM it during one:
    every restart resumes from the tracker's iteration, which is the last announced save or the
    one being written when the kill landed after its tracker update."""
    from megatron_elastic.training.checkpoint import read_tracker, resolve_load_dir

    rng = random.Random(1234)
    root = tmp_path / "ckpt"
    cmd = _train_cmd(smoke_data, tmp_path, root)
    start, interrupted_mid_save = 0, 0
    for attempt in range(5):
        log = tmp_path / f"run{attempt}.log"
        proc = _start(cmd, log)
        # Skip 0-2 saves so the kills land at different iterations; the first kill is immediate.
        target = _wait_for_save(proc, root, after=start + 1 + rng.randint(0, 2), log=log)
        time.sleep(0.0 if attempt == 0 else rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        assert _finish(proc) == -signal.SIGKILL
        if attempt:
            assert _resumed_at(log) == start, log.read_text()[-2000:]
        announced = _last_saved(log, default=start)
        tracked = read_tracker(root)
        assert tracked in (announced, announced + 1), (attempt, target, announced, tracked)
        assert tracked >= max(start, target - 1)
        assert resolve_load_dir(root).name == f"iter_{tracked:07d}"  # exists, manifest verified
        interrupted_mid_save += any(n.endswith((".partial", ".old")) for n in os.listdir(root))
        start = tracked
    assert interrupted_mid_save >= 1  # at least one kill landed inside a save (debris left)

    # SIGTERM during a save: that save completes, the next step boundary saves again, exit 75.
    log = tmp_path / "sigterm.log"
    proc = _start(cmd, log)
    target = _wait_for_save(proc, root, after=start + 1, log=log)
    time.sleep(rng.uniform(0.0, 0.05))
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc) == 75, log.read_text()[-3000:]
    text = log.read_text()
    assert _resumed_at(log) == start
    assert f"stopping at iteration {target + 1} on signal" in text, text[-2000:]
    assert read_tracker(root) == target + 1
    assert resolve_load_dir(root).name == f"iter_{target + 1:07d}"

    # And the run finishes from there.
    log = tmp_path / "final.log"
    proc = _start(_train_cmd(smoke_data, tmp_path, root, **{"train.train_iters": target + 3}), log)
    assert _finish(proc) == 0, log.read_text()[-3000:]
    assert _resumed_at(log) == target + 1
    assert read_tracker(root) == target + 3


# ------------------------------------------------------------------------ damaged checkpoints
def _corrupt(root: Path, kind: str, iteration: int = 3) -> str:
    """Damage ``root``'s iteration 3 (or its tracker); return what the error must say."""
    it3 = root / f"iter_{iteration:07d}"
    shards = sorted(p.name for p in it3.glob("__*.distcp"))
    if kind == "deleted_shard":
        (it3 / shards[-1]).unlink()
        return f"{shards[-1]} is missing"
    if kind == "truncated_shard":
        path = it3 / shards[0]
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(size // 2)
        return f"{shards[0]} is {size // 2} bytes, the save wrote {size}"
    if kind == "flipped_byte":
        path = it3 / shards[0]
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        return f"{shards[0]} fails its CRC32 check"
    if kind == "missing_common":
        (it3 / "common.pt").unlink()
        return "common.pt is missing"
    if kind == "garbage_tracker":
        (root / TRACKER).write_bytes(b"\x00\x13garbage\n")
        return f"tracker {root / TRACKER} is damaged"
    raise ValueError(kind)


# (flipped_byte needs checkpoint.checksum=true: test_save_fsyncs_every_file_and_directory)
KINDS = ("deleted_shard", "truncated_shard", "missing_common", "garbage_tracker")


def _run_main(main, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _damage_worker(rank, world_size, data, tmp, base):
    """Corrupt copies of one run; the trainer, the exporter and the evaluator on each."""
    import importlib.util

    from megatron_elastic.eval import elastic_eval
    from megatron_elastic.train import main as train_main
    from megatron_elastic.training.checkpoint import read_tracker

    spec = importlib.util.spec_from_file_location("convert_to_hf_tool", REPO / "tools" / "convert_to_hf.py")
    convert_tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert_tool)
    tmp, base = Path(tmp), Path(base)
    out = {}
    for kind in KINDS:
        root = tmp / kind
        shutil.copytree(base, root)
        bad = _corrupt(root, kind)
        argv = ["--config", str(SMOKE), *_ckpt_overrides(data, tmp, root, **{"train.train_iters": 4,
                                                                             "checkpoint.keep_last": 2})]
        rc, stdout, stderr = _run_main(train_main, argv)
        case = {"bad": bad, "rc": rc, "stderr": stderr}
        # The exporter and the evaluator name the same problem (exit 2) before any fallback.
        rc_x, _, err_x = _run_main(convert_tool.main, ["--load", str(root), "--output", str(tmp / f"hf_{kind}"),
                                                       "--no-progress", "--no-tokenizer"])
        case["export"] = (rc_x, err_x)
        eval_argv = ["--load", str(root), "--ks", "2", "--eval-iters", "1", "--no-train-reference",
                     "--output-dir", str(tmp / f"eval_{kind}")]
        rc_e, _, err_e = _run_main(elastic_eval.main, eval_argv)
        case["eval"] = (rc_e, err_e)
        if kind == "deleted_shard":
            rc_x, out_x, err_x = _run_main(convert_tool.main, [
                "--load", str(root), "--output", str(tmp / "hf_fallback"), "--no-progress", "--no-tokenizer",
                "--fallback-to-last-good"])
            case["export_fallback"] = (rc_x, out_x, err_x)
            rc_e, out_e, err_e = _run_main(elastic_eval.main, eval_argv + ["checkpoint.fallback_to_last_good=true"])
            case["eval_fallback"] = (rc_e, out_e, err_e)
            # The damaged iteration named directly (not through the tracker) is checked as well.
            rc_d, _, err_d = _run_main(train_main, argv + [f"checkpoint.load={root / 'iter_0000003'}"])
            case["direct"] = (rc_d, err_d)
        # With the fallback: the run resumes from the newest complete earlier save and finishes.
        rc, stdout, stderr = _run_main(train_main, argv + ["checkpoint.fallback_to_last_good=true"])
        case.update(fallback_rc=rc, fallback_stdout=stdout, fallback_stderr=stderr[-3000:],
                    tracker_after=read_tracker(root), listing=sorted(p.name for p in root.iterdir()))
        out[kind] = case
    return out


@pytest.fixture(scope="module")
def damaged(smoke_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("damaged")
    base = tmp / "base"
    # Three saves with keep_last=2: iterations 2 and 3 stay (retention in a real run).
    result = run_distributed(train_run, 1, _ckpt_overrides(smoke_data, tmp, base, **{
        "train.train_iters": 3, "checkpoint.keep_last": 2}), tmp_dir=tmp)[0]
    assert result["iteration"] == 3
    listing = sorted(p.name for p in base.iterdir())
    assert listing == ["iter_0000002", "iter_0000003", TRACKER], listing
    return run_distributed(_damage_worker, 1, smoke_data, str(tmp), str(base), tmp_dir=tmp)[0], base


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_damaged_checkpoint_is_named_and_fallback_resumes(damaged, kind):
    cases, base = damaged
    case = cases[kind]
    root = base.parent / kind
    earlier = root / ("iter_0000003" if kind == "garbage_tracker" else "iter_0000002")
    assert case["rc"] == 2, case["stderr"][-2000:]
    errors = [line for line in case["stderr"].splitlines() if line.startswith("error [rank 0]:")]
    assert len(errors) == 1, case["stderr"][-2000:]
    line = errors[0]
    where = str(root / TRACKER) if kind == "garbage_tracker" else f"checkpoint {root / 'iter_0000003'} is damaged"
    assert where in line and case["bad"] in line, line
    assert line.endswith(f"; the newest complete earlier checkpoint is {earlier} "
                         "(set checkpoint.fallback_to_last_good=true to load it)"), line
    # The exporter and the evaluator: exit 2, the same one line (with their own way to fall back).
    rc_x, err_x = case["export"]
    err_x_lines = [x for x in err_x.splitlines() if x.startswith("convert_to_hf.py: error:")]
    assert rc_x == 2 and len(err_x_lines) == 1, err_x
    assert case["bad"] in err_x_lines[0] and err_x_lines[0].endswith(
        f"is {earlier} (pass --fallback-to-last-good to export it)"), err_x
    rc_e, err_e = case["eval"]
    err_e_lines = [x for x in err_e.splitlines() if x.startswith("error:")]
    assert rc_e == 2 and len(err_e_lines) == 1 and case["bad"] in err_e_lines[0], err_e
    # Fallback: loads the earlier save, says so, and the run completes to iteration 4.
    assert case["fallback_rc"] == 0, case["fallback_stderr"]
    stdout = case["fallback_stdout"]
    assert f"loading the newest complete earlier checkpoint {earlier} instead" in stdout, stdout[-2000:]
    resumed = int(earlier.name.split("_")[1])
    assert f"resumed from {root} at iteration {resumed}" in stdout
    assert case["tracker_after"] == 4
    # keep_last=2 applies to the resumed run too; a re-save replaced the damaged iteration 3.
    assert case["listing"] == ["iter_0000003", "iter_0000004", TRACKER], case["listing"]
    if kind == "deleted_shard":
        rc_x, out_x, err_x = case["export_fallback"]
        assert rc_x == 0 and "exported iteration 2" in out_x, err_x
        rc_e, out_e, err_e = case["eval_fallback"]
        assert rc_e == 0 and f"elastic eval of {earlier} (iteration 2)" in out_e, err_e[-2000:]
        rc_d, err_d = case["direct"]
        assert rc_d == 2 and f"checkpoint {root / 'iter_0000003'} is damaged" in err_d


def test_damaged_without_earlier_checkpoint_says_so(tmp_path):
    """Only one save and it is damaged: the error says there is nothing earlier to fall back to."""
    from megatron_elastic.training.checkpoint import CheckpointError, resolve_load_dir

    root = tmp_path / "ckpt"
    it = root / "iter_0000005"
    it.mkdir(parents=True)
    for name in ("metadata.json", ".metadata", "common.pt"):
        (it / name).write_text("x")
    (it / "manifest.json").write_text(json.dumps({
        "format": "megatron-elastic-manifest", "version": 1, "iteration": 5, "checksum": "crc32",
        "files": {"common.pt": {"size": 1, "crc32": 0}, "metadata.json": {"size": 1, "crc32": 0}}}))
    (root / TRACKER).write_text("5\n")
    with pytest.raises(CheckpointError) as exc:
        resolve_load_dir(root, fallback_to_last_good=True)
    message = str(exc.value)
    assert "\n" not in message
    assert f"checkpoint {it} is damaged: common.pt fails its CRC32 check" in message
    assert f"{root} holds no complete earlier checkpoint below it" in message
    # A tracker that names a missing directory (no aside copy either) is named the same way.
    (root / TRACKER).write_text("9\n")
    with pytest.raises(CheckpointError, match=r"points at iteration 9 but .*iter_0000009 is missing; "):
        resolve_load_dir(root)


# ------------------------------------------------------------------------ multi-rank manifest
def _two_rank_worker(rank, world_size, data, tmp, root, ports):
    """Save on 2 ranks (EP=2); damage a file rank 1 wrote; load without and with the fallback.

    Three process groups in one pair of processes, each on its own port (gloo does not reconnect
    reliably to a port whose previous store just closed)."""
    from megatron_elastic import parallel
    from megatron_elastic.config import load_config
    from megatron_elastic.train import run
    from megatron_elastic.training.checkpoint import CheckpointError

    root = Path(root)

    def train(iters, **extra):
        os.environ["MASTER_PORT"] = str(ports.pop(0))
        cfg = load_config(SMOKE, _ckpt_overrides(data, tmp, root, **{
            "train.train_iters": iters, "parallel.expert_model_parallel_size": 2,
            "checkpoint.checksum": "true", **extra}))
        try:
            return run(cfg)
        finally:
            parallel.destroy()

    out = {"first": train(2).iteration}
    manifest = json.loads((root / "iter_0000002" / "manifest.json").read_text())
    out["manifest"] = sorted(manifest["files"])
    out["on_disk"] = sorted(p.name for p in (root / "iter_0000002").iterdir())
    shard = sorted(n for n in manifest["files"] if n.startswith("__1_"))[0]
    out["shard"] = shard
    if rank == 0:  # rank 0 decides for everyone; rank 1 waits for its verdict
        (root / "iter_0000002" / shard).unlink()
    try:
        train(3)
        out["error"] = None
    except CheckpointError as exc:
        out["error"] = str(exc)
    second = train(3, **{"checkpoint.fallback_to_last_good": "true"})
    out["second"] = (second.iteration, len(second.losses))
    return out


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_rank_save_records_every_rank_file_and_resumes(smoke_data, tmp_path):
    """Each rank sizes, CRCs and fsyncs its own shard files; on load rank 0 verifies and decides
    (error or fallback) for both ranks, which then load the same checkpoint."""
    root = tmp_path / "ckpt"
    ports = [free_port() for _ in range(3)]
    results = run_distributed(_two_rank_worker, 2, smoke_data, str(tmp_path), str(root), ports,
                              tmp_dir=tmp_path)
    # (read by rank 0 before it damaged the directory; rank 1 may look after)
    names = results[0]["manifest"]
    assert any(n.startswith("__0_") for n in names) and any(n.startswith("__1_") for n in names), names
    assert {"common.pt", "metadata.json", ".metadata", "run_config.yaml"} <= set(names)
    assert sorted(names + ["manifest.json"]) == results[0]["on_disk"]
    for out in results:
        assert out["first"] == 2
        assert out["error"] is not None and f"iter_0000002 is damaged: {out['shard']} is missing" in out["error"]
        assert out["error"].endswith(f"the newest complete earlier checkpoint is {root / 'iter_0000001'} "
                                     "(set checkpoint.fallback_to_last_good=true to load it)")
        assert out["second"] == (3, 2)  # resumed at iteration 1 on both ranks, ran 2 and 3


# ------------------------------------------------------------------------------- retention
def test_keep_last_never_deletes_tracked_newer_or_partial(tmp_path):
    from megatron_elastic.training.checkpoint_files import retain

    root = tmp_path / "ckpt"
    for i in (1, 2, 3, 4, 5, 6):
        (root / f"iter_{i:07d}").mkdir(parents=True)
    (root / "iter_0000003.old").mkdir()        # an aside copy left by an interrupted swap
    (root / "iter_0000009.partial").mkdir()    # a save being written
    (root / TRACKER).write_text("1\n")         # the tracker names an old iteration
    retain(root, 5, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == [
        "iter_0000001", "iter_0000004", "iter_0000005", "iter_0000006", "iter_0000009.partial", TRACKER]
    retain(root, 5, keep_last=None)  # null keeps everything
    assert len(list(root.iterdir())) == 6


def test_checkpoint_config_keys(tmp_path):
    from megatron_elastic.config import Config, ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^command line: checkpoint\.async_save is not supported: remove it; "
                                          r"saves are synchronous and durable$"):
        load_config(SMOKE, ["checkpoint.async_save=true"])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("checkpoint:\n  async_save: true\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(recipe))}: checkpoint\.async_save is not supported"):
        load_config(recipe)
    # Configs saved inside older checkpoints carry async_save: false; they still load.
    cfg = Config.from_dict({"checkpoint": {"async_save": False, "save": "x"}}).validate()
    assert "async_save" not in cfg.to_dict()["checkpoint"] and cfg.checkpoint.save == "x"
    for bad in ("0", "-2"):
        with pytest.raises(ConfigError, match=rf"checkpoint\.keep_last={bad} must be >= 1"):
            load_config(SMOKE, [f"checkpoint.keep_last={bad}"])
    cfg = load_config(SMOKE, ["checkpoint.keep_last=3", "checkpoint.fallback_to_last_good=true"])
    assert cfg.checkpoint.keep_last == 3 and cfg.checkpoint.fallback_to_last_good is True
    assert load_config(SMOKE).checkpoint.fallback_to_last_good is False
    assert load_config(SMOKE).checkpoint.checksum is False  # sizes only unless asked (save cost)
