#!/usr/bin/env python
"""Benchmark: what elastic routing costs next to Megatron-core's Top-k, at the all-to-all.

Times forward+backward of one MoE layer (same weights, same tokens) on ``--ep N`` expert-parallel
ranks (gloo on CPU, NCCL on GPU; N = 1 is one process), dispatcher + experts + combine including
the all-to-all, for:

* ``mcore_topk{k}``: Megatron-core's ``TopKRouter`` + ``MoEAlltoAllTokenDispatcher`` at k;
* ``elastic_fixed{k}``: ``ElasticRouter`` + ``ElasticAlltoAllTokenDispatcher``, fixed k;
* ``elastic_layerwise[1,2k]``: k drawn per step from [1, 2k];
* ``emoe_pool{k}of{k_ideal}``: EMoE candidate pool, k of the top k_ideal per token;
* ``mcore_topk{k_ideal}``: what training at k_ideal would cost instead;
* ``elastic_fixed{j}`` for every other j in [1, 2k]: the layer-wise layer with its draw pinned to
  j, so the layer-wise case can be set against the cost of exactly the k it drew each step
  (``vs_drawn_work``, the median over steps of t(step) / t_fixed(k drawn that step)) and against a
  cost proportional to k (``vs_k_over_kmax_x_kmax``: t(step) / (k_l / k_max x t_fixed(k_max)),
  what "E[k]/k_max x the Top-k_max step" asks of each draw).

For each: the median step time (the slowest rank's) and its ratio to ``mcore_topk{k}``; the bytes
per token each rank hands to the dispatch all-to-all, counted at the collective
(``torch.distributed.all_to_all_single``, token tensors only) next to the expected
k_l x hidden x element size; and the load imbalance, max/mean over EP ranks of the tokens each rank's
experts receive. Cases run round-robin, the order rotated every step (case i leads step i), so
that other load on the machine and a case's position in the round hit them alike.

    python tools/bench_elastic_moe.py [--ep 2] [--tokens 4096 --hidden 256 --experts 16 --k 2 --pool-ratio 3]
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


def policy():
    from megatron_elastic.device import policy as device_policy

    return device_policy()


def build_layer(cfg, elastic: bool):
    import copy

    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import build_module

    from megatron_elastic.models.gpt import init_weights, layer_spec, transformer_config
    from megatron_elastic.moe.layer import attach_elastic

    spec = copy.deepcopy(layer_spec(cfg, use_te=False).submodules.mlp)
    if not elastic:
        from megatron.core.transformer.moe.router import TopKRouter

        spec.module = MoELayer
        spec.submodules.router = TopKRouter
    layer = build_module(spec, config=transformer_config(cfg))
    layer.set_layer_number(1)
    if elastic:
        attach_elastic(layer, cfg.elastic)
    init_weights(layer, cfg)  # keyed by global name: every case and layout has the same weights
    return policy().move_model(layer)


class CollectiveCounter:
    """Counts what the dispatch all-to-all is handed: the first token tensor (2-d, hidden
    columns) of a forward; the second one is the combine sending expert outputs back."""

    def __init__(self, hidden: int):
        import torch.distributed as dist

        self.hidden, self.bytes, self.rows = hidden, 0, 0
        self._original = dist.all_to_all_single
        counter = self

        def counting(output, input, *args, **kwargs):
            if input.dim() == 2 and input.shape[1] == counter.hidden and counter.active:
                counter.bytes = input.numel() * input.element_size()
                counter.rows = int(input.shape[0])
                counter.active = False
            return counter._original(output, input, *args, **kwargs)

        self.active = False
        dist.all_to_all_single = counting


def step(layer, x, iteration, counter):
    """One forward+backward; returns (wall seconds, dispatch bytes, tokens received here, k)."""
    context = getattr(layer, "elastic_context", None)
    if context is not None:
        context.set(iteration, 0, 0)
    inp = x.detach().requires_grad_(True)
    policy().synchronize()
    counter.active, counter.bytes = True, 0
    t0 = time.perf_counter()
    out, _ = layer(inp)
    counter.active = False
    out.float().sum().backward()
    policy().synchronize()
    seconds = time.perf_counter() - t0
    disp = layer.token_dispatcher
    received = int(sum(disp.output_splits)) if getattr(disp, "output_splits", None) is not None \
        else int(disp.routing_map.sum())
    k = getattr(getattr(layer, "router", None), "last_k", None) or disp.config.moe_router_topk
    layer.zero_grad(set_to_none=True)
    return seconds, counter.bytes, received, k


def run(rank: int, world: int, args) -> list:
    import torch
    import torch.distributed as dist

    from megatron_elastic import parallel
    from megatron_elastic.config import Config
    from megatron_elastic.moe.schedules import KSampler

    def cfg_for(k, schedule="fixed", k_min=None, k_max=None, pool=None):
        raw = {
            "model": {"num_layers": 1, "hidden_size": args.hidden, "num_attention_heads": 4,
                      "num_query_groups": 2, "num_moe_experts": args.experts,
                      "moe_ffn_hidden_size": args.ffn, "moe_router_topk": k},
            "parallel": {"expert_model_parallel_size": world},
            "train": {"micro_batch_size": 1, "global_batch_size": world},
            "elastic": {"schedule": schedule, "k_min": k_min or k, "k_max": k_max or k,
                        "pool_ratio": pool},
        }
        return Config.from_dict(raw).validate()

    k = args.k
    k_ideal = int(-(-args.pool_ratio * k // 1))
    base_cfg = cfg_for(k)
    parallel.initialize(base_cfg)
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own tokens
    x = torch.randn(args.tokens // 4, 4, args.hidden, generator=g).to(policy().device)
    cases = [
        (f"mcore_topk{k}", base_cfg, False),
        (f"elastic_fixed{k}", base_cfg, True),
        (f"elastic_layerwise[1,{2 * k}]", cfg_for(2 * k, "layerwise", 1, 2 * k), True),
        (f"emoe_pool{k}of{k_ideal}", cfg_for(k, pool=args.pool_ratio), True),
        (f"mcore_topk{k_ideal}", cfg_for(k_ideal), False),
    ]
    pinned = [j for j in range(1, 2 * k + 1) if j != k]
    cases += [(f"elastic_fixed{j}", cases[2][1], True) for j in pinned]
    layers = [build_layer(cfg, elastic).train() for _, cfg, elastic in cases]
    for j, layer in zip(pinned, layers[-len(pinned):]):
        # The layer-wise layer with its draw pinned to j: the very path it runs at each k it draws.
        layer.router.sampler = KSampler(schedule="fixed", k_min=1, k_max=2 * k, seed=1234, fixed_k=j)
    counter = CollectiveCounter(args.hidden)
    stats = [{"times": [], "bytes_per_token": [], "expected": [], "imbalance": [], "k": []} for _ in cases]
    for it in range(args.warmup + args.iters):
        for r in range(len(layers)):
            i = (r + it) % len(layers)  # every rank rotates alike: collectives stay paired
            seconds, sent, received, k_l = step(layers[i], x, it, counter)
            row = torch.tensor([seconds, float(received)], dtype=torch.float64)
            if world > 1:
                slowest = row[:1].clone()
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                loads = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
                dist.all_gather(loads, row[1:].clone())
                loads = torch.cat(loads)
                seconds, imbalance = float(slowest), float(loads.max() / loads.mean().clamp(min=1))
            else:
                imbalance = 1.0
            if it >= args.warmup:
                s = stats[i]
                s["times"].append(seconds)
                s["imbalance"].append(imbalance)
                s["k"].append(k_l)
                if world > 1:
                    s["bytes_per_token"].append(sent / args.tokens)
                    s["expected"].append(k_l * args.hidden * x.element_size())
    parallel.destroy()
    out = []
    base = statistics.median(stats[0]["times"])
    for (name, _, _), s in zip(cases, stats):
        t = statistics.median(s["times"])
        out.append({
            "case": name, "ms": t * 1e3, "ratio": t / base, "mean_k": statistics.mean(s["k"]),
            "bytes_per_token": statistics.mean(s["bytes_per_token"]) if s["bytes_per_token"] else None,
            "expected_bytes_per_token": statistics.mean(s["expected"]) if s["expected"] else None,
            "bytes_match_every_step": s["bytes_per_token"] == s["expected"],
            "load_imbalance": statistics.mean(s["imbalance"]),
        })
    fixed = {int(r["mean_k"]): r["ms"] / 1e3 for r in out if r["case"].startswith("elastic_fixed")}
    lw, k_max = stats[2], 2 * k
    out[2]["vs_drawn_work"] = statistics.median(t / fixed[k_l] for t, k_l in zip(lw["times"], lw["k"]))
    # Cost proportional to k: each step's draw k_l over k_max times the k_max layer's time.
    out[2]["vs_k_over_kmax_x_kmax"] = statistics.median(
        t / (k_l / k_max * fixed[k_max]) for t, k_l in zip(lw["times"], lw["k"]))
    return out


def _worker(rank, world, port, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(max(1, args.threads_per_rank))
    result = run(rank, world, args)
    if rank == 0:
        queue.put(result)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (processes)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank per forward")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--pool-ratio", type=float, default=3.0)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads-per-rank", type=int, default=1, help="CPU threads per rank (--ep > 1)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    import torch

    if args.experts % args.ep:
        parser.error(f"--experts {args.experts} is not divisible by --ep {args.ep}")
    if args.ep == 1:
        results = run(0, 1, args)
    else:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        mp.start_processes(_worker, args=(args.ep, port, args, queue), nprocs=args.ep, join=True,
                           start_method="spawn")
        results = queue.get()
    threads = torch.get_num_threads() if args.ep == 1 else args.threads_per_rank
    device = policy().device_name() if policy().cuda else f"cpu ({threads} threads per rank)"
    print(f"MoE layer fwd+bwd, EP {args.ep}, {args.tokens} tokens per rank, hidden {args.hidden}, "
          f"{args.experts} experts, device {device}, median of {args.iters}")
    print(f"{'case':26s} {'ms':>9s} {'ratio':>7s} {'mean k':>7s} {'bytes/token':>12s} {'expected':>9s} "
          f"{'imbalance':>10s}")
    for r in results:
        got = f"{r['bytes_per_token']:.0f}" if r["bytes_per_token"] is not None else "-"
        want = f"{r['expected_bytes_per_token']:.0f}" if r["expected_bytes_per_token"] is not None else "-"
        print(f"{r['case']:26s} {r['ms']:9.2f} {r['ratio']:7.3f} {r['mean_k']:7.2f} {got:>12s} {want:>9s} "
              f"{r['load_imbalance']:10.3f}")
    layerwise = results[2]
    print(f"{layerwise['case']}: {layerwise['vs_drawn_work']:.3f} x the work it drew "
          f"(elastic_fixed{{j}} at each step's k), {layerwise['vs_k_over_kmax_x_kmax']:.3f} x k/k_max x the "
          f"k_max layer (elastic_fixed{2 * args.k}); medians over steps")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": device, "ep": args.ep, "tokens_per_rank": args.tokens, "hidden": args.hidden,
            "experts": args.experts, "iters": args.iters, "cases": results}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    sys.exit(main())
