#!/usr/bin/env python
"""Import a Hugging Face Mixtral / Qwen3-MoE / Qwen2-MoE / OLMoE / DeepSeek-V2/V3 directory as a
Megatron-core checkpoint.

    python tools/convert_from_hf.py --hf-dir hf/smoke --output runs/imported \\
        --tensor-model-parallel-size 1 --expert-model-parallel-size 2

Writes ``OUTPUT/latest_checkpointed_iteration.txt``, ``OUTPUT/iter_0000000/`` (weights, no
optimizer state), ``OUTPUT/tokenizer.model`` when the HF directory has one (else its Hugging Face tokenizer
files in ``OUTPUT/tokenizer/`` when it has a tokenizer.json), and
``OUTPUT/megatron_config.yaml``: a recipe with the model section, the chosen parallel layout,
``checkpoint.load`` pointing at OUTPUT with ``finetune: true``, and the elastic schedule recorded at
export (a fixed schedule otherwise). Continue training with any elastic recipe:

    python -m megatron_elastic.train --config runs/imported/megatron_config.yaml \\
        data.data_path=[...] checkpoint.save=runs/finetune elastic.schedule=layerwise \\
        elastic.k_min=1 elastic.k_max=4

Run it as one process; the checkpoint stores global tensors and loads under any TP/EP layout.
Exit status: 0 on success, 2 on a conversion error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

# Keep module-level imports light: Megatron's checkpoint writer spawns a helper process that
# re-imports this file as __main__.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="convert_from_hf.py",
        description="Hugging Face Mixtral / Qwen3-MoE / Qwen2-MoE / OLMoE directory -> Megatron-core "
                    "distributed checkpoint.",
    )
    parser.add_argument("--hf-dir", required=True, help="directory with config.json and safetensors weights")
    parser.add_argument("--output", required=True, help="checkpoint root to create")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1,
                        help="TP size written into the emitted recipe (checked against the model)")
    parser.add_argument("--expert-model-parallel-size", type=int, default=1,
                        help="EP size written into the emitted recipe (checked against the expert count)")
    parser.add_argument("--config-out", default=None,
                        help="also write the recipe here (it is always written to OUTPUT/megatron_config.yaml)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.tensor_model_parallel_size < 1 or args.expert_model_parallel_size < 1:
        parser.error("parallel sizes must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from megatron_elastic.convert.cli import EXIT_USER_ERROR, quiet_megatron_imports, run_conversion

    quiet_megatron_imports()
    from megatron_elastic.convert.from_hf import convert_hf_to_megatron

    result = run_conversion("convert_from_hf.py", lambda: convert_hf_to_megatron(
        args.hf_dir, args.output,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        config_out=args.config_out, overwrite=args.overwrite, progress=not args.no_progress,
    ))
    if result is None:
        return EXIT_USER_ERROR
    print(
        f"imported {result.architecture}: {result.num_tensors} tensors in {result.seconds:.1f}s -> "
        f"{result.checkpoint_dir}\n  recipe: {result.config_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
