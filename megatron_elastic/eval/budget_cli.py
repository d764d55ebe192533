"""``tools/search_budget.py``: the per-layer k that minimises the loss at a mean-k budget.

Runs the greedy search of ``eval/budget.py`` on the validation split (the calibration data),
scores each chosen budget and the uniform k' at the same cost on the test split when the run
has one (``data.test_data_path`` or a test share in ``data.split``), and writes
``budget_search.json``. The chosen budget is used by passing it on:

* Megatron side: ``elastic.eval_k=[2,1,1,2]`` (training/evaluation recipes, ``set_inference_k``);
* Hugging Face side: ``tools/convert_to_hf.py --inference-k 2,1,1,2`` records it as
  ``config.json: elastic_moe.inference_k``, which ``load_elastic_hf`` applies on load.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

from megatron_elastic.eval.budget import budgets_for_targets, greedy_path
from megatron_elastic.eval.settings import EvalError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/search_budget.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint root or one iter_N directory")
    parser.add_argument("--mean-k", required=True,
                        help="target mean k over the MoE layers, one or more: e.g. 1.5 or 1.5,2.5")
    parser.add_argument("--k-max", type=int, default=None,
                        help="largest k a layer may get (default 2 x the model's default k, capped at the experts)")
    parser.add_argument("--eval-iters", type=int, default=None,
                        help="global batches per measurement (default the config's train.eval_iters)")
    parser.add_argument("--output", default=None,
                        help="JSON to write (default <checkpoint root>/budget_search.json)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (e.g. data paths)")
    args = parser.parse_args(argv)
    try:
        args.mean_k = sorted(float(x) for x in args.mean_k.split(",") if x.strip())
    except ValueError:
        parser.error(f"--mean-k {args.mean_k!r}: expected numbers like 1.5,2.5")
    if not args.mean_k or min(args.mean_k) < 1:
        parser.error("--mean-k values must be >= 1")
    return args


METHOD = "greedy: +1 expert per step where the calibration (valid) loss drops most per added FLOP"


def search_budgets(model, cfg, calib, held_out, targets: List[float], k_hi: int, iters: int,
                   known_held_out: Optional[Dict[int, float]] = None, say=None) -> dict:
    """The greedy path on ``calib`` and, per target mean k, its budget; with ``held_out``, each
    budget's loss there next to uniform k' at the same mean k (linear between the two integer
    k' around it). ``known_held_out`` holds uniform held-out losses already measured (k' ->
    loss), which are then not measured again. Leaves the model at its default k."""
    from megatron_elastic.eval.routing_pass import collect
    from megatron_elastic.moe.control import set_inference_k
    from megatron_elastic.training.flops import forward_flops_per_token

    n = len(cfg.model.moe_layers)  # budgets: one k per MoE layer
    held_out_cache = {tuple([k] * n): v for k, v in (known_held_out or {}).items()}

    def flops(budget: List[float]) -> float:
        return forward_flops_per_token(cfg, budget, model.vocab_size)

    def loss(budget, reader) -> float:
        set_inference_k(model, list(budget))
        return collect(model, reader, iters, keep=False).loss

    def held_out_loss(budget) -> float:
        if tuple(budget) not in held_out_cache:
            held_out_cache[tuple(budget)] = loss(budget, held_out)
        return held_out_cache[tuple(budget)]

    path = greedy_path(n, 1, k_hi, lambda b: loss(b, calib), flops, max(targets))
    chosen = []
    for target, budget in budgets_for_targets(path, targets).items():
        mean = sum(budget) / n
        entry = {"target_mean_k": target, "budget": budget, "mean_k": mean, "flops": flops(budget),
                 "valid_loss": next(p["loss"] for p in path if p["budget"] == budget)}
        if held_out is not None:
            entry["test_loss"] = held_out_loss(budget)
            lo = int(mean)
            hi = lo if mean == lo else lo + 1
            w = mean - lo
            entry["uniform_test_loss_at_equal_flops"] = ((1 - w) * held_out_loss([lo] * n)
                                                         + w * held_out_loss([hi] * n))
            if say:
                say(f"budget {budget} (mean k {mean:g}): test {entry['test_loss']:.4f} vs uniform "
                    f"{entry['uniform_test_loss_at_equal_flops']:.4f}")
        chosen.append(entry)
    set_inference_k(model, None)
    return {"method": METHOD, "path": path, "budgets": chosen}


def search(args) -> dict:
    from megatron_elastic.config import ConfigError
    from megatron_elastic.eval.cli import load_for_eval, split_reader

    cfg, env, tokenizer, model, ckpt_dir, iteration = load_for_eval(args.load, None, args.overrides,
                                                                    args.eval_iters)
    e = cfg.model.num_moe_experts
    k_hi = args.k_max or min(2 * cfg.default_eval_k, e)
    if not 1 <= k_hi <= e:
        raise EvalError(f"--k-max {k_hi} must lie in [1, num_moe_experts={e}]")
    if max(args.mean_k) > k_hi:
        raise EvalError(f"--mean-k {max(args.mean_k):g} exceeds --k-max {k_hi}: raise --k-max")
    calib = split_reader(cfg, tokenizer, "valid")
    try:
        held_out = split_reader(cfg, tokenizer, "test")
    except ConfigError:  # no test split: report the calibration numbers only
        held_out = None
    result = search_budgets(model, cfg, calib, held_out, args.mean_k, k_hi, cfg.train.eval_iters)
    return {"checkpoint": str(ckpt_dir), "iteration": iteration, "k_range": [1, k_hi],
            "eval_iters": cfg.train.eval_iters, **result, "rank": env.rank}


def main(argv=None) -> int:
    from megatron_elastic.eval.cli import run_command

    args = parse_args(argv)

    def body() -> None:
        result = search(args)
        if result.pop("rank") != 0:
            return
        out = Path(args.output) if args.output else Path(result["checkpoint"]).parent / "budget_search.json"
        out.write_text(json.dumps(result, indent=1))
        for b in result["budgets"]:
            line = (f"mean k {b['target_mean_k']:g}: budget {','.join(map(str, b['budget']))} "
                    f"valid loss {b['valid_loss']:.4f}")
            if "test_loss" in b:
                line += (f", test loss {b['test_loss']:.4f} vs uniform at equal FLOPs "
                         f"{b['uniform_test_loss_at_equal_flops']:.4f}")
            print(line)
        best = result["budgets"][-1]["budget"]
        print(f"wrote {out}\nuse it: elastic.eval_k=[{','.join(map(str, best))}] or "
              f"tools/convert_to_hf.py --load {args.load} --output <dir> --inference-k "
              f"{','.join(map(str, best))}", flush=True)

    return run_command(body)
