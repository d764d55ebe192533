#!/usr/bin/env python
"""Export a Megatron-core checkpoint (any TP/EP layout) to a Hugging Face model directory.

    python tools/convert_to_hf.py --load runs/smoke/checkpoints --output hf/smoke

``--load`` takes a run's checkpoint root (the newest complete save, per
latest_checkpointed_iteration.txt) or one ``iter_NNNNNNN`` directory. The output is a
``MixtralForCausalLM``, ``Qwen3MoeForCausalLM`` (per-head QK-norm), ``Qwen2MoeForCausalLM``
(gated shared expert) or ``OlmoeForCausalLM`` (projection-wide QK-norm) directory that
``AutoModelForCausalLM.from_pretrained`` loads without ``trust_remote_code``: config.json (with
the elastic schedule under ``elastic_moe``), safetensors shards + index, tokenizer,
generation_config.json. The checkpoint is streamed one layer at a time (see docs/hf_conversion.md
for the memory bound); ``--report-memory`` prints the measured peak.

Exit status: 0 on success, 2 on a conversion error or a damaged checkpoint (one line naming the bad
file and the newest complete earlier checkpoint; ``--fallback-to-last-good`` exports that one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

# Keep module-level imports light: Megatron's checkpoint writer may spawn helper processes that
# re-import this file as __main__.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="convert_to_hf.py",
        description="Megatron-core distributed checkpoint -> Hugging Face Mixtral / Qwen3-MoE / Qwen2-MoE / "
                    "OLMoE directory.",
    )
    parser.add_argument("--load", required=True, help="checkpoint root (uses the latest tracker) or an iter_N directory")
    parser.add_argument("--output", required=True, help="Hugging Face directory to create")
    parser.add_argument("--architecture", default="auto",
                        choices=["auto", "mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3",
                                 "deepseek_v2"],
                        help="auto: for multi-latent attention deepseek_v3 (sigmoid router) or "
                             "deepseek_v2 (pre-softmax router), olmoe for projection-wide QK-norm, "
                             "qwen2_moe for a shared expert, qwen3_moe for per-head QK-norm, "
                             "mixtral otherwise")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dtype of the written weights (auto: as stored in the checkpoint)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer-model", default=None,
                     help="sentencepiece .model or Hugging Face tokenizer directory to export "
                          "(default: data.tokenizer_model of the checkpoint's config)")
    tok.add_argument("--no-tokenizer", action="store_true", help="export the weights without a tokenizer")
    parser.add_argument("--config", default=None,
                        help="recipe YAML describing the model, for checkpoints that do not record their config")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--fallback-to-last-good", action="store_true",
                        help="if the checkpoint fails its manifest check (a missing, truncated or corrupt "
                             "file), export the newest complete earlier one instead")
    parser.add_argument("--inference-k", default=None,
                        help="per-layer inference k to record in config.json (elastic_moe.inference_k), one "
                             "per MoE layer, e.g. 2,1,1,2 as chosen by tools/search_budget.py")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--report-memory", action="store_true",
                        help="print the peak resident memory the conversion added (Linux, /proc)")
    args = parser.parse_args(argv)
    if args.inference_k is not None:
        try:
            args.inference_k = [int(k) for k in args.inference_k.split(",") if k.strip()]
        except ValueError:
            parser.error(f"--inference-k {args.inference_k!r}: expected integers like 2,1,1,2")
    return args


def _rss_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak measures the conversion alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from megatron_elastic.convert.cli import EXIT_USER_ERROR, quiet_megatron_imports, run_conversion

    quiet_megatron_imports()
    from megatron_elastic.convert.to_hf import convert_megatron_to_hf, preload, warm_up

    measuring = False
    if args.report_memory:
        # The baseline includes the libraries and their code pages (imported and exercised once on
        # one tiny tensor), so the peak measures what the conversion itself holds.
        preload()
        warm_up(args.load)
        measuring = _reset_peak_rss()
        baseline = _rss_kib("VmRSS")
    tokenizer = False if args.no_tokenizer else args.tokenizer_model
    result = run_conversion("convert_to_hf.py", lambda: convert_megatron_to_hf(
        args.load, args.output, architecture=args.architecture, dtype=args.dtype,
        max_shard_size=args.max_shard_size, tokenizer_model=tokenizer, config=args.config,
        overwrite=args.overwrite, progress=not args.no_progress,
        fallback_to_last_good=args.fallback_to_last_good, inference_k=args.inference_k,
    ))
    if result is None:
        return EXIT_USER_ERROR
    mib = 1024 * 1024
    print(
        f"exported iteration {result.iteration} as {result.architecture}: {result.num_tensors} tensors, "
        f"{len(result.shards)} shard(s), {result.total_bytes / mib:.1f} MiB in {result.seconds:.1f}s -> {result.output}"
    )
    print(
        f"  experts per layer: {result.experts_per_layer}; largest group {result.max_group_bytes / mib:.1f} MiB, "
        f"largest shard buffer {result.max_shard_bytes / mib:.1f} MiB, tracked peak "
        f"{result.peak_tracked_bytes / mib:.1f} MiB"
    )
    if args.report_memory:
        if measuring:
            peak = _rss_kib("VmHWM")
            print(f"  peak RSS above baseline: {(peak - baseline) / 1024:.1f} MiB "
                  f"(baseline {baseline / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB)")
        else:
            print("  peak RSS: not measurable here (/proc/self/clear_refs unavailable)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
