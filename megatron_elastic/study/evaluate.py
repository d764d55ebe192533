"""Evaluation of one study run: loss at every k' on the calibration (valid) and held-out (test)
sets, router diagnostics at every k', the per-layer budget search on the calibration set and its
budgets scored on the held-out set, FLOPs per token of every setting and of training.

    python -m megatron_elastic.study.evaluate --load <checkpoints> --output result.json \
        --eval-spec '{"ks": [1, 2, 3, 4], "eval_iters": 8, "budget_mean_ks": [1.5]}' \
        [--train-summary train_summary.json] [--run '{...}'] [section.key=value ...]

Both sets are whole held-out files read in an order fixed by ``data.valid_seed`` alone, so every
arm and seed is scored on the same tokens. Writes one JSON (rank 0); the runner stores it as the
run's result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from megatron_elastic.eval.budget_cli import search_budgets
from megatron_elastic.eval.routing_pass import Pass, collect
from megatron_elastic.study import diagnostics as diag


def layer_diagnostics(passes: Dict[int, Pass], k_ref: int) -> Dict[int, dict]:
    """Per k': per-layer load, entropy, ranking stability vs k_ref, containment in k'+1, and the
    co-occurrence distance to the k_ref routing (plus their means over layers)."""
    out = {}
    ref = passes.get(k_ref)
    for k, p in passes.items():
        layers = []
        for l, (m, s) in enumerate(zip(p.maps, p.scores)):
            d = {**diag.expert_load(m), "entropy": diag.router_entropy(s)}
            if ref is not None:
                d["spearman_vs_ref"] = diag.ranking_spearman(s, ref.scores[l])
                d["cooc_dist_to_ref"] = diag.cooccurrence_distance(m, ref.maps[l])
            if k + 1 in passes:
                d["containment_in_next"] = diag.containment(m, passes[k + 1].maps[l])
            layers.append(d)
        mean = {key: sum(d[key] for d in layers) / len(layers) for key in layers[0]}
        out[k] = {"per_layer": layers, "mean": mean}
    return out


def evaluate_run(load: str, eval_spec: dict, overrides: List[str], summary: Optional[dict],
                 say=print) -> dict:
    from megatron_elastic.eval.cli import load_for_eval, split_reader
    from megatron_elastic.moe.control import set_inference_k
    from megatron_elastic.training.flops import forward_flops_per_token, training_flops_per_token

    t0 = time.time()
    cfg, env, tokenizer, model, ckpt_dir, iteration = load_for_eval(load, None, overrides,
                                                                    eval_spec.get("eval_iters"))
    n_exp, n_layers = cfg.model.num_moe_experts, len(cfg.model.moe_layers)  # budgets: one k per MoE layer
    ks = sorted(k for k in (eval_spec.get("ks") or range(1, 2 * cfg.k_train + 1)) if 1 <= k <= n_exp)
    k_ref = cfg.default_eval_k
    iters = cfg.train.eval_iters
    vocab = model.vocab_size
    readers = {split: split_reader(cfg, tokenizer, split) for split in ("valid", "test")}

    def flops(budget: List[float]) -> float:
        return forward_flops_per_token(cfg, budget, vocab)

    losses: Dict[str, Dict[int, float]] = {"valid": {}, "test": {}}
    passes: Dict[int, Pass] = {}
    for k in ks:
        set_inference_k(model, k)
        for split, reader in readers.items():
            p = collect(model, reader, iters, keep=(split == "valid" and eval_spec.get("diagnostics", True)))
            losses[split][k] = p.loss
            if split == "valid":
                passes[k] = p
        say(f"k'={k}: valid {losses['valid'][k]:.4f} test {losses['test'][k]:.4f}")
    diagnostics = layer_diagnostics(passes, k_ref) if passes and passes[ks[0]].maps else {}
    passes.clear()

    # Per-layer budget search on the calibration (valid) set, scored on the held-out (test) set
    # next to the uniform k' losses measured above.
    targets = sorted(float(t) for t in eval_spec.get("budget_mean_ks") or [])
    search = (search_budgets(model, cfg, readers["valid"], readers["test"], targets, max(ks), iters,
                             known_held_out=losses["test"], say=say) if targets else None)
    set_inference_k(model, None)

    train = dict(summary or {})
    if train.get("mean_k_per_layer"):
        per_token = training_flops_per_token(cfg, train["mean_k_per_layer"], vocab)
        tokens = cfg.train.train_iters * cfg.train.global_batch_size * cfg.model.seq_length
        train.update(train_flops_per_token=per_token, train_tokens=tokens, train_flops=per_token * tokens)
    e = cfg.elastic
    return {
        "schema": 1,
        "checkpoint": str(ckpt_dir),
        "iteration": iteration,
        "model": {"num_layers": cfg.model.num_layers, "num_moe_experts": n_exp, "hidden_size": cfg.model.hidden_size,
                  "moe_ffn_hidden_size": cfg.model.moe_ffn_hidden_size,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "moe_router_topk": cfg.model.moe_router_topk,
                  "moe_router_pre_softmax": cfg.model.moe_router_pre_softmax},
        "elastic": {"schedule": e.schedule, "k_min": cfg.elastic_k_min, "k_max": cfg.elastic_k_max,
                    "distribution": e.distribution, "tau": e.tau, "top_p": e.top_p,
                    "pool_ratio": e.pool_ratio, "router_loss_coeff": e.router_loss_coeff},
        "k_ref": k_ref,
        "eval": {"ks": ks, "eval_iters": iters, "tokens_per_setting": cfg.train.eval_iters
                 * cfg.train.global_batch_size * cfg.model.seq_length, "valid_seed": cfg.data.valid_seed},
        "loss": {split: {str(k): v for k, v in d.items()} for split, d in losses.items()},
        "ppl": {split: {str(k): math.exp(v) for k, v in d.items()} for split, d in losses.items()},
        "flops_per_token": {str(k): flops([k] * n_layers) for k in ks},
        "diagnostics": {str(k): v for k, v in diagnostics.items()},
        "budget_search": search,
        "train": train,
        "eval_seconds": round(time.time() - t0, 1),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megatron_elastic.study.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="the run's checkpoint root")
    parser.add_argument("--output", required=True, help="result JSON to write")
    parser.add_argument("--eval-spec", required=True, help="the study's eval section as JSON")
    parser.add_argument("--train-summary", default=None, help="train_summary.json of the run")
    parser.add_argument("--run", default="{}", help="the run's identity (JSON), stored as is")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (data paths)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from megatron_elastic.eval.cli import run_command

    args = parse_args(argv)

    def body() -> None:
        summary = None
        if args.train_summary and Path(args.train_summary).is_file():
            summary = json.loads(Path(args.train_summary).read_text())
        result = evaluate_run(args.load, json.loads(args.eval_spec), args.overrides, summary,
                              say=lambda m: print(m, flush=True))
        result["run"] = json.loads(args.run)
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out)
        print(f"wrote {out}", flush=True)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
