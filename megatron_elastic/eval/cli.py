"""Elastic evaluation command line: arguments, loading the checkpoint, the sweep, the outputs.

``main`` (also ``tools/elastic_eval.py``) parses the arguments, resolves ``--load`` to a verified
checkpoint directory (``training/checkpoint.resolve_load_dir``), recovers the run config it was
saved with through the converter's shared reader (``convert/megatron_checkpoint.recover_run_config``:
``--config``, else the checkpoint's ``run_config.yaml``, else its saved config), builds the model
under the current launch, runs ``sweep.sweep`` on the validation (or test) split and writes the
table, JSON and plot (``report.write_outputs``) on rank 0. User errors exit 2 with one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import torch

from megatron_elastic.eval.report import write_outputs
from megatron_elastic.eval.settings import (
    EvalError,
    check_settings,
    default_ks,
    parse_budgets,
    parse_ks,
    parse_top_ps,
)
from megatron_elastic.eval.sweep import sweep


def _load_run_config(ckpt_dir: Path, config_path: Optional[str], overrides: List[str]):
    """The checkpoint's own config (or ``--config``) with command-line overrides, validated."""
    from megatron_elastic.convert.megatron_checkpoint import UnreadableCommonStateError, recover_run_config

    try:
        found = recover_run_config(ckpt_dir, config_path, overrides, run_config_first=True, lenient=False,
                                   saved_source=f"{ckpt_dir} (saved config)")
    except UnreadableCommonStateError as exc:
        raise EvalError(
            f"{ckpt_dir} has no run_config.yaml and its common state cannot be read ({exc.cause}); "
            "pass --config with the recipe the checkpoint was trained with"
        ) from exc.cause
    if found is None:
        raise EvalError(f"{ckpt_dir} stores no config: pass --config with the training recipe")
    return found[0]


def _fallback_requested(overrides: List[str]) -> bool:
    """``checkpoint.fallback_to_last_good=true`` among the overrides: a damaged checkpoint (one
    that fails its manifest check) is replaced by the newest complete earlier one."""
    import yaml

    from megatron_elastic.config import ConfigError

    value = None
    for item in overrides:
        key, _, raw = item.partition("=")
        if key.strip() == "checkpoint.fallback_to_last_good":
            value = yaml.safe_load(raw) if raw else None
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"command line: checkpoint.fallback_to_last_good must be true or false, got {value!r}")
    return bool(value)


def _single_process() -> bool:
    world = os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
    return int(world) == 1


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tools/elastic_eval.py",
        description=(
            "Validation loss and perplexity of an elastic MoE checkpoint at every inference k', "
            "per-layer budget and top-p threshold, with the expert co-occurrence diagnostic. "
            "Writes elastic_eval.txt (table), elastic_eval.json and elastic_eval.png."
        ),
    )
    parser.add_argument("--load", required=True,
                        help="checkpoint: a run's checkpoint root (uses the latest tracker) or one iter_N dir")
    parser.add_argument("--config", default=None,
                        help="recipe YAML (default: the checkpoint's own run_config.yaml)")
    parser.add_argument("--ks", default=None,
                        help="global k' values, e.g. 1,2,3,4 or 1-8 (default 1..2*k_max, capped at the expert count)")
    parser.add_argument("--budgets", default=None,
                        help="per-layer budgets, one k per MoE layer, ';'-separated, e.g. \"4,2;1,4\"")
    parser.add_argument("--top-p", dest="top_p", default=None,
                        help="top-p thresholds, e.g. 0.5,0.9 (per-token k in [1, num_experts])")
    parser.add_argument("--eval-iters", type=int, default=None,
                        help="global batches to evaluate per setting (default: the config's train.eval_iters)")
    parser.add_argument("--split", choices=("valid", "test"), default="valid", help="dataset split (default valid)")
    parser.add_argument("--output-dir", default=None,
                        help="where to write the outputs (default <checkpoint root>/elastic_eval/iter_N)")
    parser.add_argument("--no-train-reference", dest="train_reference", action="store_false",
                        help="skip the training-routing pass (M_train, cooc_dist_train)")
    parser.add_argument("--save-matrices", action="store_true",
                        help="store every setting's per-layer co-occurrence matrices in the JSON")
    parser.add_argument("overrides", nargs="*",
                        help="section.key=value overrides, e.g. data.data_path=[runs/x/data/corpus_text_document]")
    return parser.parse_args(argv)


def load_for_eval(load, config_path: Optional[str], overrides: List[str], eval_iters: Optional[int] = None,
                  check_request=None):
    """A verified checkpoint loaded for evaluation under the current launch: ``(cfg, env,
    tokenizer, model, ckpt_dir, iteration)``. The run config is the checkpoint's own (or
    ``config_path``) with ``overrides``; a single process reshards any saved TP/EP layout.
    ``check_request(cfg)`` runs once the config is known and before anything is built, so a
    request the model cannot serve fails first, with its own message."""
    from megatron_elastic import parallel
    from megatron_elastic.data.tokenizer import load_tokenizer
    from megatron_elastic.models.gpt import build_model
    from megatron_elastic.training.checkpoint import load_checkpoint, resolve_load_dir

    load = Path(load)
    if not load.exists():
        raise EvalError(f"--load {load}: no such checkpoint directory")
    ckpt_dir = resolve_load_dir(load, _fallback_requested(overrides))
    if ckpt_dir is None:
        raise EvalError(
            f"--load {load}: no checkpoint found (no latest_checkpointed_iteration.txt and no "
            "metadata.json); point it at a run's checkpoint root or at one iter_N directory"
        )
    # dist_checkpointing reshards, so the layout is the launch's, not the checkpoint's. No launch
    # evaluates with pipeline stages: the sweep tallies every MoE layer's routing on each rank's
    # model, which must hold all layers. One process also drops TP/EP (any saved layout loads).
    layout = ["parallel.pipeline_model_parallel_size=1", "parallel.virtual_pipeline_model_parallel_size=null"]
    if _single_process():
        layout = ["parallel.tensor_model_parallel_size=1", "parallel.expert_model_parallel_size=1",
                  "parallel.expert_tensor_parallel_size=1", "parallel.sequence_parallel=false"] + layout
    overrides = layout + list(overrides)
    overrides += ["checkpoint.save=null", f"checkpoint.load={ckpt_dir}", "checkpoint.finetune=false",
                  "logging.tensorboard_dir=null", "logging.wandb_project=null"]
    if eval_iters is not None:
        if eval_iters < 1:
            raise EvalError(f"--eval-iters {eval_iters} must be >= 1")
        overrides.append(f"train.eval_iters={eval_iters}")
    cfg = _load_run_config(ckpt_dir, config_path, overrides)
    if cfg.parallel.pipeline_model_parallel_size > 1:
        raise EvalError(
            f"parallel.pipeline_model_parallel_size={cfg.parallel.pipeline_model_parallel_size}: the "
            "elastic evaluation tallies every MoE layer's routing on each rank's model, so it runs "
            "without pipeline stages; drop that override (a checkpoint saved with pipeline stages "
            "reshards on load; use tensor/expert parallelism to spread a large model)"
        )
    if check_request is not None:
        check_request(cfg)

    from megatron_elastic.train import check_environment

    env = parallel.initialize(cfg)
    check_environment(cfg)
    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer_model)
    model = build_model(cfg, tokenizer.vocab_size)
    iteration = load_checkpoint(ckpt_dir, model, None, cfg, finetune=False)
    return cfg, env, tokenizer, model, ckpt_dir, iteration


def split_reader(cfg, tokenizer, split: str):
    """A ``BatchReader`` over this rank's share of the ``valid`` or ``test`` split."""
    from megatron.core import parallel_state as ps

    from megatron_elastic.config import ConfigError
    from megatron_elastic.data.datasets import BatchReader, build_datasets

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    datasets = build_datasets(cfg, tokenizer, dp_size)
    dataset = datasets[1] if split == "valid" else datasets[2]
    if dataset is None:
        raise ConfigError(
            f"the {split} split is empty under data.split={cfg.data.split!r}: pass "
            f"data.split=... (e.g. 90,5,5), data.test_data_path=[...] or --split valid"
        )
    t = cfg.train
    return BatchReader(dataset, t.micro_batch_size, t.global_batch_size, dp_rank, dp_size)


def run(args: argparse.Namespace) -> dict:
    ks = parse_ks(args.ks)
    budgets = parse_budgets(args.budgets)
    top_ps = parse_top_ps(args.top_p)
    def check_request(cfg) -> None:
        check_settings(ks if ks is not None else default_ks(cfg), budgets, top_ps, len(cfg.model.moe_layers),
                       cfg.model.num_moe_experts)

    cfg, env, tokenizer, model, ckpt_dir, common_iteration = load_for_eval(
        args.load, args.config, args.overrides, args.eval_iters, check_request)
    if ks is None:
        ks = default_ks(cfg)
    reader = split_reader(cfg, tokenizer, args.split)
    t = cfg.train
    say = (lambda msg: print(msg, flush=True)) if env.rank == 0 else None
    if say:
        say(f"elastic eval of {ckpt_dir} (iteration {common_iteration}) | schedule {cfg.elastic.schedule} "
            f"k in [{cfg.elastic_k_min}, {cfg.elastic_k_max}] | {t.eval_iters} x {t.global_batch_size} "
            f"{args.split} sequences per setting | world {env.world_size}")
    results = sweep(model, reader, cfg, ks=ks, budgets=budgets, top_ps=top_ps, eval_iters=t.eval_iters,
                    train_reference=args.train_reference, keep_matrices=args.save_matrices, progress=say)
    results["checkpoint"] = str(ckpt_dir)
    results["iteration"] = common_iteration
    results["eval"]["split"] = args.split
    results["eval"]["world_size"] = env.world_size
    results["rank"] = env.rank
    return results


def default_output_dir(ckpt_dir: Path) -> Path:
    ckpt_dir = Path(ckpt_dir)
    return ckpt_dir.parent / "elastic_eval" / ckpt_dir.name


def run_command(body: Callable[[], None]) -> int:
    """The tail every evaluation command line shares: ``body()`` under wandb-off, a user error
    (bad request, config, checkpoint, rendezvous) printed as one line with exit 2, and the
    process group torn down however it ends."""
    from megatron_elastic import parallel
    from megatron_elastic.config import ConfigError
    from megatron_elastic.training.checkpoint import CheckpointError

    os.environ.setdefault("WANDB_MODE", "disabled")
    try:
        body()
    except (EvalError, ConfigError, CheckpointError, parallel.RendezvousError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        parallel.destroy()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)

    def body() -> None:
        results = run(args)
        if results.pop("rank", 0) == 0:
            out = Path(args.output_dir) if args.output_dir else default_output_dir(Path(results["checkpoint"]))
            paths = write_outputs(results, out)
            print(paths["txt"].read_text(), end="", flush=True)
            print("wrote " + ", ".join(str(p) for p in paths.values()), flush=True)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
