#!/usr/bin/env python
"""Benchmark: what elastic routing costs next to Megatron-core's Top-k, measured side by side.

Times forward+backward of one MoE layer (same weights, same tokens) for:

* ``mcore_topk{k}``: Megatron-core's ``TopKRouter`` + ``MoEAlltoAllTokenDispatcher`` at k;
* ``elastic_fixed{k}``: ``ElasticRouter`` + ``ElasticAlltoAllTokenDispatcher``, fixed k;
* ``elastic_layerwise``: k drawn per step from [1, k_max];
* ``emoe_pool{k}of{k_ideal}``: EMoE candidate pool, k of the top k_ideal per token;
* ``mcore_topk{k_ideal}``: what training at k_ideal would cost instead.

and prints each time as a ratio to ``mcore_topk{k}``, plus the rows handed to the all-to-all per
token (mean over steps). The claim checked: an EMoE pool trains at the cost of k (ratio ~1), not of k_ideal.

    python tools/bench_elastic_moe.py [--tokens 4096 --hidden 256 --experts 16 --k 2 --pool-ratio 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")


def build_layer(cfg, elastic: bool):
    import copy

    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import build_module

    from megatron_elastic.models.gpt import layer_spec, transformer_config
    from megatron_elastic.moe.layer import attach_elastic

    spec = copy.deepcopy(layer_spec(cfg, use_te=False).submodules.mlp)
    if not elastic:
        from megatron.core.transformer.moe.router import TopKRouter

        spec.module = MoELayer
        spec.submodules.router = TopKRouter
    layer = build_module(spec, config=transformer_config(cfg))
    layer.set_layer_number(1)
    if elastic:
        attach_elastic(layer, cfg)
    return layer


def step(layer, x, iteration: int) -> float:
    """One forward+backward; returns its wall time."""
    import torch

    context = getattr(layer, "elastic_context", None)
    if context is not None:
        context.set(iteration, 0, 0)
    inp = x.detach().requires_grad_(True)
    t0 = time.perf_counter()
    out, _ = layer(inp)
    out.float().sum().backward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    layer.zero_grad(set_to_none=True)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per forward (seq x batch)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--pool-ratio", type=float, default=3.0)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    from megatron_elastic import parallel
    from megatron_elastic.config import Config

    def cfg_for(k, schedule="fixed", k_min=None, k_max=None, pool=None):
        raw = {
            "model": {"num_layers": 1, "hidden_size": args.hidden, "num_attention_heads": 4,
                      "num_query_groups": 2, "num_moe_experts": args.experts,
                      "moe_ffn_hidden_size": args.ffn, "moe_router_topk": k},
            "elastic": {"schedule": schedule, "k_min": k_min or k, "k_max": k_max or k,
                        "pool_ratio": pool},
        }
        return Config.from_dict(raw).validate()

    k = args.k
    k_ideal = int(-(-args.pool_ratio * k // 1))
    base_cfg = cfg_for(k)
    parallel.initialize(base_cfg)
    torch.manual_seed(0)
    x = torch.randn(args.tokens // 4, 4, args.hidden)
    if torch.cuda.is_available():
        x = x.cuda()
    reference = build_layer(base_cfg, elastic=False)
    state = reference.state_dict()

    cases = [
        (f"mcore_topk{k}", base_cfg, False),
        (f"elastic_fixed{k}", base_cfg, True),
        (f"elastic_layerwise[1,{2 * k}]", cfg_for(2 * k, "layerwise", 1, 2 * k), True),
        (f"emoe_pool{k}of{k_ideal}", cfg_for(k, pool=args.pool_ratio), True),
        (f"mcore_topk{k_ideal}", cfg_for(k_ideal), False),
    ]
    layers = []
    for name, cfg, elastic in cases:
        layer = build_layer(cfg, elastic)
        layer.load_state_dict(state)
        if torch.cuda.is_available():
            layer.cuda()
        layer.train()
        layers.append(layer)
    # Round-robin so that load from other processes hits every case alike.
    times = [[] for _ in cases]
    rows = [[] for _ in cases]
    for it in range(args.warmup + args.iters):
        for i, layer in enumerate(layers):
            seconds = step(layer, x, it)
            if it >= args.warmup:
                times[i].append(seconds)
                routed = layer.token_dispatcher.routing_map.sum()
                rows[i].append(float(routed) / args.tokens)
    results = [
        (name, statistics.median(times[i]), statistics.mean(rows[i]))
        for i, (name, _, _) in enumerate(cases)
    ]
    base = results[0][1]
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"MoE layer fwd+bwd, {args.tokens} tokens, hidden {args.hidden}, {args.experts} experts, "
          f"device {device}, median of {args.iters}")
    print(f"{'case':28s} {'ms':>9s} {'ratio':>7s} {'slots/token':>12s}")
    for name, seconds, rows_per_token in results:
        print(f"{name:28s} {seconds * 1e3:9.2f} {seconds / base:7.2f} {rows_per_token:12.2f}")
    parallel.destroy()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    sys.exit(main())
