#!/usr/bin/env python
"""Benchmark: whole training steps of the same model, elastic vs Megatron-core's stock MoE spec.

One process (one device), one model size, the same token batch for every case; each step is
forward + backward over every micro-batch, Megatron's gradient finalisation and the optimizer
step, exactly as ``megatron_elastic.train`` runs it. Cases, timed round-robin so that any other
load on the machine hits them alike:

* ``stock_top{k}``: Megatron-core's own ``MoELayer`` + ``TopKRouter`` + all-to-all dispatcher;
* ``elastic_fixed{k}``: this project's router and dispatcher at the same fixed k;
* ``emoe_pool{k}of{k_ideal}``: the EMoE candidate pool at k_train = k;
* ``mmoe_layerwise[1,{k_max}]``: M-MoE, a per-layer k drawn uniformly from [1, k_max];
* ``stock_top{k_max}``: Megatron-core at k_max;
* ``elastic_fixed{j}`` for every other j in [1, k_max]: the cost of each k the layer-wise case
  draws, measured on the same path.

The round order is rotated every step (case i leads step i), so neither a case's position after
another nor a drift of the machine over the run favours one case.

Printed (and written with ``--json``): median step time, tokens/s, the ratio to ``stock_top{k}``
and, for the layer-wise case, three yardsticks its cost is judged by:

* ``vs_drawn_work``: the cost of exactly the work it drew. A step with per-(micro-batch, layer)
  draws k_ml costs A + sum_ml b(k_ml), where A does not depend on k and b(j) is one layer's MoE
  cost for one micro-batch at k = j; the fixed-j step costs T(j) = A + M L b(j), so the drawn
  step should cost mean_ml T(k_ml), computed per step from the draws and the measured T(j). The
  median of the per-step ratios is the overhead of varying k itself.
* ``vs_target_Ek_over_kmax_x_topkmax``: E[k]/k_max x the ``stock_top{k_max}`` step (the issue's
  target). It charges A (attention, embeddings, output layer, optimizer) as if it scaled with k,
  so at best layer-wise reaches (A + E[k] B) / (E[k]/k_max (A + k_max B)): met only where the
  experts dominate the step (``--ffn`` large next to ``--hidden``, e.g. Mixtral's proportions).
* ``vs_target_at_drawn_k``: the same target for each step's own draws (their mean k for E[k]),
  free of the luck of the draw over a few steps.
* ``vs_linear_in_k``: the stock cost interpolated linearly in k between k and k_max to E[k].

Each is given for the whole step and for its forward+backward part alone (``fwd_bwd``): the
optimizer step costs the same at every k and scales with the parameter count, which a real global
batch (thousands of sequences per optimizer step) amortises and this benchmark's few micro-batches
do not.

    python tools/bench_train.py [--layers 4 --hidden 256 --experts 16 --k 2 --k-max 4 --steps 12]
    python tools/bench_train.py --ffn 2048 --experts 8 --seq 128   # experts dominate the step
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")


def make_cfg(args, schedule="fixed", k=None, k_min=None, k_max=None, pool=None):
    from megatron_elastic.config import Config

    k = k or args.k
    raw = {
        "model": {"num_layers": args.layers, "hidden_size": args.hidden, "num_attention_heads": 4,
                  "num_query_groups": 2, "seq_length": args.seq, "num_moe_experts": args.experts,
                  "moe_ffn_hidden_size": args.ffn, "moe_router_topk": k, "vocab_size": args.vocab},
        "train": {"micro_batch_size": args.micro_batch, "global_batch_size": args.micro_batch * args.microbatches,
                  "seed": 1234},
        "elastic": {"schedule": schedule, "k_min": k_min or k, "k_max": k_max or k, "pool_ratio": pool},
    }
    return Config.from_dict(raw).validate()


class Case:
    def __init__(self, name, cfg, stock: bool, fixed_k=None):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        from megatron_elastic.models.gpt import build_model
        from megatron_elastic.moe.router import elastic_routers
        from megatron_elastic.training.optim import build_optimizer

        self.name, self.cfg, self.stock, self.fixed_k = name, cfg, stock, fixed_k
        self.model = build_model(cfg, cfg.model.vocab_size, stock_moe=stock)
        self.ddp = DistributedDataParallel(
            config=self.model.config,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, average_in_collective=False),
            module=self.model,
        )
        self.optimizer = build_optimizer(cfg, self.ddp)
        self.context = getattr(self.model, "elastic_context", None)
        self.routers = elastic_routers(self.model)
        # Per timed step: its seconds, those of its forward+backward part (the rest is the
        # gradient finalisation and the optimizer step, whose cost a larger global batch
        # amortises), and the k every (micro-batch, MoE layer) forward used.
        self.times, self.fb_times, self.draws = [], [], []

    def step(self, iteration, batches):
        from megatron.core.distributed import finalize_model_grads

        from megatron_elastic.device import policy

        policy().synchronize()
        t0 = time.perf_counter()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        draws = []
        for mb, (tokens, pos) in enumerate(batches):
            if self.context is not None:
                self.context.set(iteration, mb, mb * tokens.shape[0])
            loss = self.ddp(tokens, pos, None, labels=tokens).float().mean()
            draws.extend(r.last_k for r in self.routers)  # host ints: no sync
            (loss / len(batches)).backward()
        policy().synchronize()
        forward_backward = time.perf_counter() - t0
        finalize_model_grads([self.ddp])
        self.optimizer.step(1e-4)
        policy().synchronize()
        return time.perf_counter() - t0, forward_backward, draws


def drawn_work_ratios(times, draws, fixed_times) -> list:
    """Per step: its time over the cost of the work it drew, mean_ml T(k_ml) (module docstring).

    ``times[i]``: step i's seconds; ``draws[i]``: the k of each of its (micro-batch, layer)
    forwards; ``fixed_times[j]``: the step time at fixed k = j."""
    return [t / statistics.mean(fixed_times[k] for k in ks) for t, ks in zip(times, draws)]


def layerwise_yardsticks(cases, timing: str, k: int, k_max: int, e_k: float) -> dict:
    """The layer-wise case (cases[3]) against its yardsticks (module docstring), on the case
    attribute ``timing``: whole steps ("times") or their forward+backward part ("fb_times")."""
    def median(case):
        return statistics.median(getattr(case, timing))

    lw_case, base, top_kmax = cases[3], median(cases[0]), median(cases[4])
    fixed = {c.fixed_k: median(c) for c in cases if c.fixed_k is not None}
    per_step = drawn_work_ratios(getattr(lw_case, timing), lw_case.draws, fixed)
    lw, target = median(lw_case), e_k / k_max * top_kmax
    slope = (top_kmax - base) / (k_max - k)  # stock cost(k) is affine in k: two measured points
    return {
        "vs_drawn_work": statistics.median(per_step),
        "vs_drawn_work_range": [min(per_step), max(per_step)],
        "vs_target_Ek_over_kmax_x_topkmax": lw / target,
        # The same target for each step's own draws (their mean k in place of E[k]).
        "vs_target_at_drawn_k": statistics.median(
            t / (statistics.mean(ks) / k_max * top_kmax) for t, ks in zip(getattr(lw_case, timing), lw_case.draws)),
        "vs_linear_in_k": lw / (base + slope * (e_k - k)),
        # What the target allows at best here: the drawn work itself against the target.
        "best_possible_vs_target": statistics.median(
            statistics.mean(fixed[k_] for k_ in ks) for ks in lw_case.draws) / target,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--k-max", type=int, default=4)
    parser.add_argument("--pool-ratio", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not 1 <= args.k < args.k_max <= args.experts:
        parser.error(f"need 1 <= --k < --k-max <= --experts, got k {args.k}, k_max {args.k_max}, "
                     f"experts {args.experts}")

    import torch

    from megatron_elastic import parallel
    from megatron_elastic.device import policy
    from megatron_elastic.moe.schedules import KSampler

    k, k_max = args.k, args.k_max
    k_ideal = int(-(-args.pool_ratio * k // 1))
    parallel.initialize(make_cfg(args))
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.microbatches):
        tokens = torch.randint(0, args.vocab, (args.micro_batch, args.seq), generator=g).to(policy().device)
        pos = torch.arange(args.seq, device=tokens.device).unsqueeze(0).expand_as(tokens)
        batches.append((tokens, pos))
    cases = [
        Case(f"stock_top{k}", make_cfg(args), stock=True),
        Case(f"elastic_fixed{k}", make_cfg(args), stock=False, fixed_k=k),
        Case(f"emoe_pool{k}of{k_ideal}", make_cfg(args, pool=args.pool_ratio), stock=False),
        Case(f"mmoe_layerwise[1,{k_max}]", make_cfg(args, "layerwise", k=k_max, k_min=1, k_max=k_max),
             stock=False),
        Case(f"stock_top{k_max}", make_cfg(args, k=k_max), stock=True),
    ]
    for j in range(1, k_max + 1):
        if j != k:
            # The layer-wise model with its draw pinned to j: the very path the layer-wise case
            # runs at each k it draws (a fixed-k=1 config would be refused for renormalised gates).
            case = Case(f"elastic_fixed{j}", make_cfg(args, "layerwise", k=k_max, k_min=1, k_max=k_max),
                        stock=False, fixed_k=j)
            pinned = KSampler(schedule="fixed", k_min=1, k_max=k_max, seed=1234, fixed_k=j)
            for router in case.routers:
                router.sampler = pinned
            cases.append(case)
    for it in range(args.warmup + args.steps):
        for i in range(len(cases)):
            case = cases[(i + it) % len(cases)]
            seconds, forward_backward, draws = case.step(it, batches)
            if it >= args.warmup:
                case.times.append(seconds)
                case.fb_times.append(forward_backward)
                case.draws.append(draws)

    tokens_per_step = args.seq * args.micro_batch * args.microbatches
    base = statistics.median(cases[0].times)
    rows = []
    for case in cases:
        t = statistics.median(case.times)
        ks = [k_ for step in case.draws for k_ in step]
        rows.append({"case": case.name, "ms": t * 1e3, "fwd_bwd_ms": statistics.median(case.fb_times) * 1e3,
                     "tokens_per_s": tokens_per_step / t, "ratio": t / base,
                     "mean_k": statistics.mean(ks) if ks else None})
    layerwise = rows[3]
    layerwise["expected_k"] = e_k = (1 + k_max) / 2  # uniform draw over [1, k_max]
    layerwise.update(layerwise_yardsticks(cases, "times", k, k_max, e_k))
    layerwise["fwd_bwd"] = layerwise_yardsticks(cases, "fb_times", k, k_max, e_k)
    device = policy().device_name() if policy().cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"Training step (fwd+bwd over {args.microbatches} micro-batches + optimizer), {args.layers} layers, "
          f"hidden {args.hidden}, ffn {args.ffn}, {args.experts} experts, {tokens_per_step} tokens/step, "
          f"{device}, median of {args.steps}")
    print(f"{'case':26s} {'ms':>9s} {'fwd+bwd ms':>10s} {'tokens/s':>10s} {'ratio':>7s} {'mean k':>7s}")
    for r in rows:
        mk = f"{r['mean_k']:.2f}" if r["mean_k"] is not None else "-"
        print(f"{r['case']:26s} {r['ms']:9.1f} {r['fwd_bwd_ms']:10.1f} {r['tokens_per_s']:10.0f} "
              f"{r['ratio']:7.3f} {mk:>7s}")
    print(f"layer-wise k (E[k] = {e_k:g}, drawn mean {layerwise['mean_k']:.2f}), whole step | forward+backward:")
    fb = layerwise["fwd_bwd"]
    for key, what in (("vs_drawn_work", "x the work it drew (elastic_fixed{j} at each step's draws)"),
                      ("vs_target_Ek_over_kmax_x_topkmax", f"x E[k]/k_max x stock_top{k_max} (the target)"),
                      ("vs_target_at_drawn_k", "x the target at each step's drawn mean k"),
                      ("best_possible_vs_target", "the drawn work itself x the target"),
                      ("vs_linear_in_k", "x the stock cost interpolated linearly in k to E[k]")):
        print(f"  {layerwise[key]:.3f} | {fb[key]:.3f}  {what}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": device, "cases": rows},
                                              indent=2))
    parallel.destroy()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    sys.exit(main())
