"""Runs a study: data once, then every arm x seed through the normal training entry point
(``python -m megatron_elastic.train``), then its evaluation (``megatron_elastic.study.evaluate``),
``jobs`` runs at a time, each on its own CPU thread budget.

Resumable at every level: prepared data is reused; a run whose result file exists with the
same fingerprint is skipped; an interrupted run's training resumes from its last checkpoint
(the trainer's own ``checkpoint.load``); a finished training is not repeated. A stored result
with another fingerprint (the spec changed under it) stops the runner with the files to remove.

Per run, under ``work_dir/<protocol>/<arm>/seed<s>/``: ``checkpoints/``, ``train.log``,
``train_summary.json``; the result, small and meant to be committed, is
``results_dir/runs/<protocol>__<arm>__seed<s>.json``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from megatron_elastic.study.spec import Run, Study, StudyError

REPO = Path(__file__).resolve().parents[2]
_ITER_LINE = re.compile(r"^iter\s+(\d+)/\d+ \| loss ([0-9.eE+-]+|nan|inf)")
_RATE_FIELD = re.compile(r"\| tokens/s ([0-9.]+)")
_K_FIELD = re.compile(r"\| k ([0-9.,]+)(?: \||$)")


# ---------------------------------------------------------------------- data
def data_paths(study: Study) -> Dict[str, Path]:
    d = study.work_dir / "data"
    return {
        "corpus": d / "corpus.jsonl",
        "tokenizer": study.work_dir / "tokenizer" / "spm.model",
        "train": d / "train_text_document",
        "valid": d / "valid_text_document",
        "test": d / "test_text_document",
        "ready": d / "ready.json",
    }


def prepare_data(study: Study, say: Callable[[str], None]) -> Dict[str, Path]:
    """Corpus with held-out files, tokenizer (trained on the training part only), indexed data."""
    paths = data_paths(study)
    spec = study.data
    if paths["ready"].is_file():
        stored = json.loads(paths["ready"].read_text())
        if stored.get("spec") != spec:
            raise StudyError(
                f"{paths['ready']} was prepared from data spec {stored.get('spec')} but the study "
                f"now says {spec}: remove {paths['ready'].parent} and {paths['tokenizer'].parent} "
                "to rebuild (the trained runs depend on it too)")
        return paths
    holdout = spec.get("holdout") or {"valid": 500_000, "test": 500_000}
    if set(holdout) != {"valid", "test"}:
        raise StudyError("data.holdout must give byte sizes for valid (calibration) and test "
                         "(held-out), e.g. {valid: 800000, test: 800000}")
    py = sys.executable
    cmd = [py, "tools/build_corpus.py", "--output", str(paths["corpus"]),
           "--seed", str(spec.get("corpus_seed", 7))]
    for name, size in holdout.items():
        cmd += ["--holdout", f"{name}={int(size)}"]
    if spec.get("max_bytes"):
        cmd += ["--max-bytes", str(int(spec["max_bytes"]))]
    _check_call(cmd, say, "corpus")
    _check_call([py, "tools/train_tokenizer.py", "--input", str(paths["corpus"]), "--output-prefix",
                 str(paths["tokenizer"].with_suffix("")), "--vocab-size", str(spec.get("vocab_size", 2000))],
                say, "tokenizer")
    for split, src in (("train", paths["corpus"]),
                       ("valid", paths["corpus"].with_name("corpus.valid.jsonl")),
                       ("test", paths["corpus"].with_name("corpus.test.jsonl"))):
        out = paths[split].with_name(split)  # tools/preprocess_data.py appends _text_document
        _check_call([py, "tools/preprocess_data.py", "--input", str(src), "--tokenizer-model",
                     str(paths["tokenizer"]), "--output-prefix", str(out), "--workers", "1",
                     "--no-progress"], say, f"preprocess {split}")
    paths["ready"].write_text(json.dumps({"spec": spec}, indent=1))
    return paths


def _check_call(cmd: List[str], say, what: str) -> None:
    say(f"[data] {what}: {' '.join(cmd[1:4])} ...")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StudyError(f"data step '{what}' failed (exit {proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()[-800:]}")


# ---------------------------------------------------------------------- one run
def run_dir(study: Study, run: Run) -> Path:
    return study.work_dir / run.protocol / run.arm.name / f"seed{run.seed}"


def result_path(study: Study, run: Run) -> Path:
    return study.results_dir / "runs" / f"{run.key}.json"


def checkpoint_dir(study: Study, run: Run) -> Path:
    return run_dir(study, run) / "checkpoints"


def base_checkpoint(study: Study, run: Run) -> Optional[Path]:
    p = study.protocols[run.protocol]
    if run.base_of is not None or not p.base:
        return None
    return checkpoint_dir(study, study.base_run(p))


def train_overrides(study: Study, run: Run, paths: Dict[str, Path]) -> List[str]:
    from megatron_elastic.training.checkpoint_files import tracked_checkpoint

    ckpt = checkpoint_dir(study, run)
    base = base_checkpoint(study, run)
    own = ckpt.is_dir() and tracked_checkpoint(ckpt) is not None
    out = study.run_overrides(run) + [
        f"train.seed={run.seed}",
        f"train.train_iters={run.train_iters}",
        f"data.data_path=[{paths['train']}]",
        f"data.valid_data_path=[{paths['valid']}]",
        f"data.test_data_path=[{paths['test']}]",
        f"data.tokenizer_model={paths['tokenizer']}",
        f"checkpoint.save={ckpt}",
        "checkpoint.keep_last=1",
        "logging.log_interval=1",
        "logging.tensorboard_dir=null",
        "logging.wandb_project=null",
    ]
    if base is not None and not own:
        # First start of a continued arm: the base's weights, a fresh optimizer and schedule.
        out += [f"checkpoint.load={base}", "checkpoint.finetune=true"]
    else:
        out += [f"checkpoint.load={ckpt}", "checkpoint.finetune=false"]
    return out


def parse_train_log(text: str, tokens_per_iter: int = 0) -> dict:
    """Per-iteration loss, realised k per layer and step time from the trainer's log lines
    (``logging.log_interval=1``; the last occurrence of an iteration wins: a resumed run repeats
    none, one restarted from an earlier checkpoint may). ``step_seconds`` sums tokens per
    iteration / tokens/s: the training time without start-up, saves and evaluation."""
    by_iter: Dict[int, tuple] = {}
    seconds: Dict[int, float] = {}
    for line in text.splitlines():
        m = _ITER_LINE.match(line)
        if m:
            k = _K_FIELD.search(line)
            ks = [float(x) for x in k.group(1).split(",")] if k else None
            by_iter[int(m.group(1))] = (float(m.group(2)), ks)
            rate = _RATE_FIELD.search(line)
            if rate and float(rate.group(1)) > 0:
                seconds[int(m.group(1))] = tokens_per_iter / float(rate.group(1))
    iters = sorted(by_iter)
    losses = [by_iter[i][0] for i in iters]
    ks = [by_iter[i][1] for i in iters if by_iter[i][1] is not None]
    mean_k = [sum(col) / len(col) for col in zip(*ks)] if ks else None
    tail = losses[-max(1, len(losses) // 10):] if losses else []
    return {"iterations_logged": len(iters), "last_iteration": iters[-1] if iters else 0,
            "train_loss_last10pct": sum(tail) / len(tail) if tail else None,
            "mean_k_per_layer": mean_k, "step_seconds": round(sum(seconds.values()), 1)}


def train(study: Study, run: Run, paths: Dict[str, Path], threads: int, say) -> dict:
    """Train (or resume) one run to its train_iters; its summary (realised k, wall time)."""
    from megatron_elastic.training.checkpoint_files import tracked_checkpoint

    rd = run_dir(study, run)
    rd.mkdir(parents=True, exist_ok=True)
    summary_path = rd / "train_summary.json"
    fp = study.fingerprint(run)
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("fingerprint") == fp:
            return summary
        raise StudyError(f"{rd} was trained for another spec (fingerprint {summary.get('fingerprint')} "
                         f"!= {fp}): remove {rd} (and {result_path(study, run)}) to retrain it")
    ckpt = checkpoint_dir(study, run)
    done = tracked_checkpoint(ckpt) if ckpt.is_dir() else None
    log = rd / "train.log"
    if done is None or done[0] < run.train_iters:
        cmd = [sys.executable, "-m", "megatron_elastic.train", "--config", str(study.recipe)]
        cmd += train_overrides(study, run, paths)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
        say(f"[train] {run.key} ({run.train_iters} iterations)")
        t0 = time.time()
        with open(log, "a") as f:
            f.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
            f.flush()
            rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
        wall = time.time() - t0
        if rc != 0:
            raise StudyError(f"training {run.key} failed (exit {rc}): see {log}")
    else:
        wall = 0.0
    from megatron_elastic.config import load_config

    cfg = load_config(study.recipe, train_overrides(study, run, paths))
    parsed = parse_train_log(log.read_text() if log.is_file() else "",
                             cfg.train.global_batch_size * cfg.model.seq_length)
    summary = {"fingerprint": fp, "key": run.key, "train_iters": run.train_iters,
               "train_wall_s": parsed["step_seconds"], "last_invocation_wall_s": round(wall, 1),
               "threads": threads,
               "base_checkpoint": str(base_checkpoint(study, run)) if base_checkpoint(study, run) else None,
               **parsed}
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def evaluate(study: Study, run: Run, paths: Dict[str, Path], summary: dict, threads: int, say) -> None:
    out = result_path(study, run)
    out.parent.mkdir(parents=True, exist_ok=True)
    rd = run_dir(study, run)
    cmd = [sys.executable, "-m", "megatron_elastic.study.evaluate",
           "--load", str(checkpoint_dir(study, run)), "--output", str(out),
           "--eval-spec", json.dumps(study.eval), "--train-summary", str(rd / "train_summary.json"),
           "--run", json.dumps({"protocol": run.protocol, "arm": run.arm.name, "seed": run.seed,
                                "description": run.arm.description, "overrides": run.arm.overrides,
                                "base_of": run.base_of, "fingerprint": study.fingerprint(run)}),
           f"data.valid_data_path=[{paths['valid']}]", f"data.test_data_path=[{paths['test']}]",
           f"data.data_path=[{paths['train']}]", f"data.tokenizer_model={paths['tokenizer']}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    say(f"[eval] {run.key}")
    with open(rd / "eval.log", "a") as f:
        rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise StudyError(f"evaluation of {run.key} failed (exit {rc}): see {rd / 'eval.log'}")


def stored_result(study: Study, run: Run) -> Optional[dict]:
    path = result_path(study, run)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    fp = study.fingerprint(run)
    if data.get("run", {}).get("fingerprint") != fp:
        raise StudyError(f"{path} holds a result for another spec (fingerprint "
                         f"{data.get('run', {}).get('fingerprint')} != {fp}): remove it and "
                         f"{run_dir(study, run)} to redo this run")
    return data


# ---------------------------------------------------------------------- the whole study
def run_study(study: Study, jobs: int = 1, stage: str = "all", protocols: Optional[List[str]] = None,
              say: Callable[[str], None] = print) -> List[str]:
    """Train and evaluate every run not yet done; returns the keys of the runs that failed."""
    paths = prepare_data(study, say)
    runs = study.runs(protocols)
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    lock = threading.Lock()
    pending = [r for r in runs if stored_result(study, r) is None]
    finished: Dict[str, bool] = {r.key: True for r in runs if r not in pending}
    failed: List[str] = []
    say(f"{len(runs)} runs, {len(runs) - len(pending)} already done; {jobs} at a time x {threads} threads")

    def ready(r: Run) -> Optional[bool]:
        """True = can start; None = must wait for its base; False = its base failed."""
        p = study.protocols[r.protocol]
        if r.base_of is not None or not p.base:
            return True
        return finished.get(study.base_run(p).key)

    def worker() -> None:
        while True:
            with lock:
                job = None
                for r in list(pending):
                    state = ready(r)
                    if state is False:
                        pending.remove(r)
                        failed.append(r.key)
                        finished[r.key] = False
                    elif state:
                        job = r
                        pending.remove(r)
                        break
                if job is None and not pending:
                    return
            if job is None:
                time.sleep(2)
                continue
            ok = True
            try:
                summary = train(study, job, paths, threads, say)
                if stage != "train":
                    evaluate(study, job, paths, summary, threads, say)
            except StudyError as exc:
                ok = False
                say(f"[failed] {job.key}: {exc}")
            with lock:
                finished[job.key] = ok
                if not ok:
                    failed.append(job.key)
                elif stage != "train":
                    say(f"[done] {job.key} -> {result_path(study, job)}")

    threads_ = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, jobs))]
    for t in threads_:
        t.start()
    for t in threads_:
        t.join()
    return failed
