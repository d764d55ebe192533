#!/usr/bin/env python
"""GPU check: everything a lent GPU should confirm, in one command, into one summary file.

    tools/gpu_check.sh [--out runs/gpu_check]          # on one GPU, under 8 minutes
    tools/gpu_check.sh --dry-run [--out DIR]           # the same steps on CPU at toy size (CI)

Steps (each recorded as passed/failed with its output tail; a failed step does not stop the rest):

1. ``data``: a corpus from the Python standard library's text, a sentencepiece tokenizer, Megatron
   .bin/.idx (nothing is downloaded).
2. ``tests``: the elastic layer, dispatcher, device-path and training tests, on the device the
   policy picks (multi-rank tests need one GPU per rank and skip on a single GPU).
3. ``train_bf16``: ``configs/small.yaml`` shrunk to fit, 50 steps in bf16 with Megatron's
   distributed optimizer (and the Transformer Engine spec when TE imports); the loss must fall.
4. ``train_fp32``: the first ``--compare-steps`` steps again in fp32; each step's bf16 loss must
   agree with fp32 within ``--rel-tol`` (relative).
5. ``bench``: ``tools/bench_elastic_moe.py`` on the device (ratios to Megatron-core's Top-k).
6. ``bench_train``: ``tools/bench_train.py``, whole training steps of the same model with
   Megatron-core's MoE spec and with this project's (ratios, and the layer-wise case against the
   work it drew and against E[k]/k_max x the Top-k_max step).

The summary (``summary.json`` and ``summary.txt`` in ``--out``) lists each step, tokens/s,
TFLOP/s and MFU per device, peak memory, the bf16-vs-fp32 agreement and the benchmark ratios.
``--dry-run`` runs on CPU at toy size with fp32 standing in for bf16 (the CPU optimizer path) so
the script is exercised in CI and cannot rot; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ITER_LINE = re.compile(r"^iter\s+(\d+)/\d+ \| loss ([0-9.eE+-]+|nan|inf) \|.*")


def run(cmd, log: Path, env=None, timeout=None) -> tuple[int, str, float]:
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out, rc = out + f"\n[timed out after {timeout}s]", 124
    log.write_text(out)
    return rc, out, time.time() - t0


def parse_train_log(text: str) -> dict:
    losses, last = {}, {}
    for line in text.splitlines():
        m = ITER_LINE.match(line)
        if not m:
            continue
        losses[int(m.group(1))] = float(m.group(2))
        fields = dict(part.strip().rsplit(" ", 1) for part in line.split("|")[1:] if " " in part.strip())
        last = fields
    out = {"losses": losses}
    for key, name in (("tokens/s", "tokens_per_s"), ("TFLOP/s/dev", "tflops_per_device")):
        if key in last:
            out[name] = float(last[key])
    if "MFU" in last:
        out["mfu_percent"] = float(last["MFU"].rstrip("%"))
    mem = re.findall(r"peak mem ([0-9.]+) GiB", text)
    if mem:
        out["peak_mem_gib"] = float(mem[-1])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks the script")
    parser.add_argument("--out", default="runs/gpu_check", help="summary and logs go here")
    parser.add_argument("--steps", type=int, default=None, help="bf16 training steps (50; dry run 6)")
    parser.add_argument("--compare-steps", type=int, default=None, help="fp32 steps compared (10; dry 3)")
    parser.add_argument("--rel-tol", type=float, default=0.02,
                        help="bf16 vs fp32 loss agreement per step, relative (default 0.02)")
    args = parser.parse_args(argv)

    dry = args.dry_run
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""
    steps = args.steps or (6 if dry else 50)
    compare = min(args.compare_steps or (3 if dry else 10), steps)
    summary = {"dry_run": dry, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {}}

    def record(name, rc, seconds, extra=None, ok=None):
        passed = (rc == 0) if ok is None else bool(ok and rc == 0)
        summary["steps"][name] = {"passed": passed, "rc": rc, "seconds": round(seconds, 1),
                                  "log": f"{name}.log", **(extra or {})}
        print(f"[gpu_check] {name}: {'passed' if passed else 'FAILED'} ({seconds:.0f}s)", flush=True)
        return passed

    device = subprocess.run(
        [py, "-c", "from megatron_elastic.device import policy; p = policy(); "
                   "print(p.device_name(), p.use_te_spec)"],
        cwd=REPO, capture_output=True, text=True, env=env,
    ).stdout.split()
    summary["device"] = " ".join(device[:-1]) if device else "unknown"
    summary["te_spec"] = device[-1:] == ["True"]

    # 1. data
    data = out / "data"
    data.mkdir(exist_ok=True)
    size = "400000" if dry else "8000000"
    vocab = "512" if dry else "4096"
    t0 = time.time()
    rc = 0
    for cmd in (
        [py, "tools/build_corpus.py", "--output", str(data / "corpus.jsonl"), "--max-bytes", size],
        [py, "tools/train_tokenizer.py", "--input", str(data / "corpus.jsonl"), "--output-prefix",
         str(data / "spm"), "--vocab-size", vocab, "--model-type", "bpe"],
        [py, "tools/preprocess_data.py", "--input", str(data / "corpus.jsonl"), "--tokenizer-model",
         str(data / "spm.model"), "--output-prefix", str(data / "corpus"), "--workers", "2",
         "--no-progress"],
    ):
        if rc == 0:
            rc, _, _ = run(cmd, out / "data.log", env=env)
    record("data", rc, time.time() - t0)

    # 2. tests on the device
    tests = ["tests/test_device_path.py", "tests/moe/test_router.py", "tests/moe/test_router_syncs.py",
             "tests/moe/test_dispatcher.py", "tests/moe/test_control.py", "tests/test_train.py", "tests/test_gpu.py"]
    cmd = [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests]
    if dry:
        cmd += ["-k", "seeds_the_rng_tracker or fixed_k_matches_megatron_topk_router"]
    rc, text, secs = run(cmd, out / "tests.log", env=env, timeout=None if dry else 300)
    tail = [line for line in text.strip().splitlines() if line.strip()][-1:] or [""]
    record("tests", rc, secs, {"result": tail[0]})

    # 3./4. training: bf16 (+ distributed optimizer) and the fp32 reference
    shrink = [
        "model.num_layers=4", "model.seq_length=1024", "train.micro_batch_size=4",
        "train.global_batch_size=16", "train.lr_warmup_iters=5", "train.eval_interval=0",
        "train.eval_iters=2", "logging.log_interval=1", "logging.tensorboard_dir=null",
        "logging.wandb_project=null", "checkpoint.save=null", "checkpoint.load=null",
        "checkpoint.save_interval=null", "data.split=95,5,0",
        f"data.data_path=[{data / 'corpus_text_document'}]", f"data.tokenizer_model={data / 'spm.model'}",
    ]
    if dry:
        shrink += ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                   "model.num_query_groups=2", "model.seq_length=64", "model.moe_ffn_hidden_size=64",
                   "train.micro_batch_size=2", "train.global_batch_size=4",
                   "model.make_vocab_size_divisible_by=64"]
    base = [py, "-m", "megatron_elastic.train", "--config", "configs/small.yaml", *shrink]
    bf16 = ["train.bf16=false"] if dry else ["train.bf16=true", "train.use_distributed_optimizer=true"]
    rc, text, secs = run(base + [f"train.train_iters={steps}", f"train.lr_decay_iters={steps}", *bf16],
                         out / "train_bf16.log", env=env, timeout=None if dry else 300)
    bf16_run = parse_train_log(text)
    losses = bf16_run.pop("losses")
    first = sum(losses.get(i, float("nan")) for i in range(1, 4)) / 3
    final = sum(losses.get(i, float("nan")) for i in range(steps - 2, steps + 1)) / 3
    falls = len(losses) == steps and final < first
    record("train_bf16", rc, secs, {**bf16_run, "loss_first3": first, "loss_last3": final,
                                    "loss_falls": falls}, ok=falls)
    summary["throughput"] = bf16_run

    # Same schedule (lr_decay_iters fixed to the bf16 run's length), only the first steps.
    rc, text, secs = run(base + [f"train.train_iters={compare}", f"train.lr_decay_iters={steps}",
                                 "train.bf16=false", "train.use_distributed_optimizer=false"],
                         out / "train_fp32.log", env=env, timeout=None if dry else 300)
    fp32 = parse_train_log(text)["losses"]
    diffs = [abs(losses[i] - fp32[i]) / abs(fp32[i]) for i in range(1, compare + 1)
             if i in losses and i in fp32]
    agree = len(diffs) == compare and max(diffs) <= args.rel_tol
    record("train_fp32", rc, secs, {"compared_steps": compare, "max_rel_diff": max(diffs) if diffs else None,
                                    "rel_tol": args.rel_tol, "agree": agree}, ok=agree)

    # 5. benchmark
    bench_args = (["--tokens", "256", "--hidden", "32", "--ffn", "32", "--experts", "8", "--iters", "2",
                   "--warmup", "1"] if dry else ["--tokens", "16384", "--hidden", "1024", "--ffn", "2048",
                                                  "--experts", "16", "--iters", "20"])
    rc, text, secs = run([py, "tools/bench_elastic_moe.py", *bench_args, "--json", str(out / "bench.json")],
                         out / "bench.log", env=env, timeout=None if dry else 300)
    bench = json.loads((out / "bench.json").read_text()) if rc == 0 else None
    record("bench", rc, secs, {"cases": bench["cases"] if bench else None})

    # 6. whole training steps
    train_bench_args = (["--layers", "2", "--hidden", "32", "--ffn", "32", "--experts", "8", "--seq", "32",
                         "--vocab", "256", "--micro-batch", "2", "--steps", "2", "--warmup", "1"] if dry
                        else ["--layers", "4", "--hidden", "1024", "--ffn", "2048", "--experts", "8",
                              "--seq", "1024", "--vocab", "32000", "--micro-batch", "4", "--microbatches", "4",
                              "--steps", "10"])
    rc, text, secs = run([py, "tools/bench_train.py", *train_bench_args, "--json", str(out / "bench_train.json")],
                         out / "bench_train.log", env=env, timeout=None if dry else 300)
    bench_train = json.loads((out / "bench_train.json").read_text()) if rc == 0 else None
    record("bench_train", rc, secs, {"cases": bench_train["cases"] if bench_train else None})

    summary["passed"] = all(s["passed"] for s in summary["steps"].values())
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [f"gpu_check {'(dry run, CPU) ' if dry else ''}on {summary['device']} "
             f"(TE spec: {summary['te_spec']}) at {summary['started']}"]
    for name, s in summary["steps"].items():
        lines.append(f"  {name:11s} {'passed' if s['passed'] else 'FAILED':6s} {s['seconds']:7.1f}s")
    t = summary.get("throughput", {})
    lines.append(f"  throughput: {t.get('tokens_per_s', float('nan')):.0f} tokens/s, "
                 f"{t.get('tflops_per_device', float('nan')):.4g} TFLOP/s/device, "
                 f"MFU {t.get('mfu_percent', 'n/a')}%, peak memory {t.get('peak_mem_gib', 'n/a')} GiB")
    f = summary["steps"]["train_fp32"]
    lines.append(f"  bf16 vs fp32 over {f['compared_steps']} steps: max relative loss difference "
                 f"{f['max_rel_diff']} (tolerance {f['rel_tol']})")
    if bench:
        lines.append("  bench (ratio to Megatron-core Top-k): " + ", ".join(
            f"{c['case']} {c['ratio']:.2f}" for c in bench["cases"]))
    if bench_train:
        lines.append("  bench_train (ratio to Megatron-core's MoE spec): " + ", ".join(
            f"{c['case']} {c['ratio']:.2f}" for c in bench_train["cases"]))
        lw = next(c for c in bench_train["cases"] if c["case"].startswith("mmoe_layerwise"))
        lines.append(f"  layer-wise: {lw['vs_drawn_work']:.3f} x the work it drew, "
                     f"{lw['vs_target_Ek_over_kmax_x_topkmax']:.3f} x E[k]/k_max x Top-k_max")
    lines.append(f"  overall: {'PASSED' if summary['passed'] else 'FAILED'}")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
