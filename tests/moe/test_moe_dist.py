"""Multi-process (gloo) tests of the elastic MoE layer under expert parallelism.

World size = EP (2 and 4), TP = 1, so DP = EP: every rank feeds its own micro-batch (distinct
tokens, sample offset ``rank * micro_batch``) through a two-layer residual stack of
``ElasticMoELayer``s whose experts are spread over the ranks. The reference is this (pytest)
process with EP = 1: the same layers (same weights: ``init_weights`` keys every tensor by its
global name) hold all experts and run each rank's input separately under the same step context
(iteration, micro-batch, sample offset). Per rank, outputs, input gradients and router gradients
must match the reference run on that rank's input; an expert's gradient on the rank that holds it
must match the reference gradient of that expert summed over all ranks' inputs (it received
tokens from every rank through the all-to-all).

Scenarios: (a) fixed k, (b) per-layer k (``layerwise``), (c) EMoE candidate pool (same seed),
plus per-token top-p, dropless and padded-to-capacity. And the all-to-all volume: with EP = 2
the dispatch all-to-all moves tokens x k_l x hidden x element-size bytes per rank for any
candidate-pool size k_ideal, counted both by the dispatcher and by a wrapper around
``torch.distributed.all_to_all_single``.

The worker functions are module-level (spawned processes import this module); the builders come
from ``tests/moe_builders.py``.
"""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch

from moe_builders import (  # noqa: F401 (single_process: fixture requested by name)
    BATCH,
    HIDDEN,
    SEQ,
    build_stack,
    close_rel,
    forward_backward,
    loss_weights,
    make_cfg,
    make_input,
    reset_moe_globals,
    single_process,
)

from helpers import run_distributed

from megatron_elastic.device import policy

pytestmark = [
    pytest.mark.multiproc,
    # On a GPU machine every rank needs its own GPU (NCCL refuses two ranks on one device).
    pytest.mark.skipif(policy().cuda and torch.cuda.device_count() < 4, reason="needs 4 GPUs under NCCL"),
]

ITERATIONS = (0, 1, 2)

SCENARIOS: Dict[str, dict] = {
    "fixed_k": {"model.moe_router_topk": 2, "model.moe_z_loss_coeff": 1e-3},
    "layerwise_k": {"elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 4},
    "pool": {"elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 3,
             "elastic.pool_ratio": 2.0, "elastic.router_loss_coeff": 0.1},
    "top_p": {"elastic.schedule": "top_p", "elastic.top_p": 0.5, "elastic.k_min": 1,
              "elastic.k_max": 4, "model.init_method_std": 0.2},
    "top_p_padded": {"elastic.schedule": "top_p", "elastic.top_p": 0.5, "elastic.k_min": 1,
                     "elastic.k_max": 4, "model.init_method_std": 0.2,
                     "model.moe_expert_capacity_factor": 1.0,
                     "model.moe_pad_expert_input_to_capacity": True},
}
# Every scenario uses two MoE layers so per-layer k differs inside one forward.
COMMON = {"model.num_layers": 2}

BYTES_EXPERTS = 12  # k_ideal = 3 x 3 = 9 must fit; divisible by EP = 2 (and 4)
BYTES_KS = (1, 2, 3)
BYTES_POOLS = (None, 2.0, 3.0)


def _seed(rank: int, iteration: int) -> int:
    return 1000 * iteration + rank


def _scenario_cfg(name: str, ep: int):
    return make_cfg({**COMMON, **SCENARIOS[name], "parallel.expert_model_parallel_size": ep})


# ---------------------------------------------------------------------- spawned workers
def _ep_worker(rank: int, world_size: int, names: List[str], with_bytes: bool) -> dict:
    torch.set_num_threads(1)
    from megatron_elastic import parallel

    parallel.initialize(make_cfg({"parallel.expert_model_parallel_size": world_size}))
    try:
        out = {"runs": {}, "bytes": None}
        for name in names:
            reset_moe_globals()
            layers = build_stack(_scenario_cfg(name, world_size))
            layers.train()
            runs = []
            for it in ITERATIONS:
                layers.elastic_context.set(it, 0, rank * BATCH)
                res = forward_backward(layers, make_input(_seed(rank, it)), loss_weights(_seed(rank, it)))
                res["local_experts"] = [list(layer.local_expert_indices) for layer in layers]
                res["dispatch_rows"] = [layer.token_dispatcher.last_dispatch_rows for layer in layers]
                runs.append(res)
            out["runs"][name] = runs
        if with_bytes:
            out["bytes"] = _count_dispatch_bytes(rank, world_size)
        return out
    finally:
        parallel.destroy()


def _count_dispatch_bytes(rank: int, world_size: int) -> dict:
    """For each (k_l, pool_ratio): dispatcher's record and every all_to_all_single of a forward."""
    import torch.distributed as dist

    from megatron_elastic.moe.schedules import KSampler

    calls: list = []
    original = dist.all_to_all_single

    def counting(output, input, *args, **kwargs):
        calls.append({"bytes": input.numel() * input.element_size(), "rows": int(input.shape[0]),
                      "dim": input.dim(), "elt": input.element_size()})
        return original(output, input, *args, **kwargs)

    results = {}
    dist.all_to_all_single = counting
    try:
        for pool in BYTES_POOLS:
            cfg = make_cfg({
                "model.num_moe_experts": BYTES_EXPERTS, "elastic.schedule": "layerwise",
                "elastic.k_min": 1, "elastic.k_max": 3, "elastic.pool_ratio": pool,
                "parallel.expert_model_parallel_size": world_size,
            })
            layers = build_stack(cfg)
            layers.train()
            layer = layers[0]
            layer.router.record_routing = True
            for k in BYTES_KS:
                layer.router.sampler = KSampler("fixed", 1, 3, fixed_k=k)
                layers.elastic_context.set(k, 0, rank * BATCH)
                x = make_input(_seed(rank, 50 + k)).requires_grad_(True)
                calls.clear()
                out = layers[0](x)[0]
                forward_calls = list(calls)
                out.sum().backward()
                results[(k, pool)] = {
                    "last_k": layer.router.last_k,
                    "per_token_k": layer.router.last_routing_map.sum(-1).unique().tolist(),
                    "dispatch_bytes": layer.token_dispatcher.last_dispatch_bytes,
                    "dispatch_rows": layer.token_dispatcher.last_dispatch_rows,
                    "forward_calls": forward_calls,
                    "backward_calls": list(calls[len(forward_calls):]),
                }
    finally:
        dist.all_to_all_single = original
    return results


# ---------------------------------------------------------------------- reference (this process)
# The reference runs in this process under moe_builders' one-process parallel state, requested by
# name (not autouse: the fixture is imported for the tests that ask for it).


def _reference(name: str, world_size: int) -> List[dict]:
    """Per iteration: each rank's input run alone through the EP=1 layers."""
    reset_moe_globals()
    layers = build_stack(_scenario_cfg(name, 1))
    layers.train()
    per_it = []
    for it in ITERATIONS:
        ranks = []
        for rank in range(world_size):
            layers.elastic_context.set(it, 0, rank * BATCH)
            ranks.append(forward_backward(layers, make_input(_seed(rank, it)), loss_weights(_seed(rank, it))))
        summed = {key: sum(r["expert_grads"][key] for r in ranks) for key in ranks[0]["expert_grads"]}
        per_it.append({"ranks": ranks, "expert_grads": summed})
    return per_it


_EP_CACHE: Dict[int, object] = {}


def _ep_results(world_size: int, tmp_path_factory) -> list:
    """One spawned run per EP size serves every test (the spawn dominates the cost); a failed
    run is remembered too, so the other tests fail fast with the same error."""
    if world_size not in _EP_CACHE:
        try:
            _EP_CACHE[world_size] = run_distributed(
                _ep_worker, world_size, list(SCENARIOS), world_size == 2,
                tmp_dir=tmp_path_factory.mktemp(f"ep{world_size}"), timeout=420,
            )
        except Exception as exc:  # noqa: BLE001
            _EP_CACHE[world_size] = exc
    result = _EP_CACHE[world_size]
    if isinstance(result, Exception):
        raise AssertionError(f"EP={world_size} run failed") from result
    return result


REL = 1e-5  # max|EP - reference| <= REL x max|reference|, per tensor


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_expert_parallel_matches_single_process(world_size, scenario, single_process, tmp_path_factory):
    results = _ep_results(world_size, tmp_path_factory)
    ref = _reference(scenario, world_size)
    n = make_cfg().model.num_moe_experts
    ks_seen = set()
    for i, it in enumerate(ITERATIONS):
        held = {}
        for rank, res in enumerate(results):
            got = res["runs"][scenario][i]
            want = ref[i]["ranks"][rank]
            tag = f"EP={world_size} {scenario} it={it} rank={rank}"
            # every rank holds its own slice of the experts
            assert got["local_experts"] == [
                list(range(rank * n // world_size, (rank + 1) * n // world_size))
            ] * 2, tag
            assert got["last_k"] == want["last_k"], tag
            close_rel(got["out"], want["out"], REL, f"{tag} outputs")
            close_rel(got["x_grad"], want["x_grad"], REL, f"{tag} input grads")
            for li in range(2):
                assert float(want["router_grads"][li].abs().max()) > 0, tag
                close_rel(got["router_grads"][li], want["router_grads"][li], REL, f"{tag} router {li} grads")
            for key, grad in got["expert_grads"].items():
                assert key not in held, f"expert {key} held twice"
                held[key] = grad
            ks_seen.update(k for k in got["last_k"] if k is not None)
        # local expert grads = reference grads of that expert summed over all ranks' inputs
        assert held.keys() == ref[i]["expert_grads"].keys()
        for key, grad in held.items():
            close_rel(grad, ref[i]["expert_grads"][key], REL, f"EP={world_size} {scenario} it={it} expert {key}")
        # the ranks really exchanged different inputs
        assert not torch.equal(results[0]["runs"][scenario][i]["out"], results[1]["runs"][scenario][i]["out"])
    if scenario in ("layerwise_k", "pool"):
        assert len(ks_seen) >= 2, f"{scenario}: k never varied ({ks_seen})"
        assert any(
            len(set(r["runs"][scenario][i]["last_k"])) > 1 for r in results for i in range(len(ITERATIONS))
        ), f"{scenario}: the two layers never used different k"
    if scenario == "fixed_k":
        assert ks_seen == {2}


@pytest.mark.slow
@pytest.mark.parametrize("pool", BYTES_POOLS)
@pytest.mark.parametrize("k", BYTES_KS)
def test_all_to_all_bytes_follow_k_not_k_ideal(k, pool, tmp_path_factory):
    from megatron_elastic.moe.routing_math import candidate_pool_size

    results = _ep_results(2, tmp_path_factory)
    tokens, elt = SEQ * BATCH, 4  # fp32
    expect = tokens * k * HIDDEN * elt
    if pool is not None:
        k_ideal = candidate_pool_size(k, pool, BYTES_EXPERTS)
        assert k_ideal == round(pool * k) > k
    combine_total = backward_total = 0
    for rank, res in enumerate(results):
        rec = res["bytes"][(k, pool)]
        tag = f"rank {rank} k={k} pool={pool}"
        assert rec["last_k"] == k and rec["per_token_k"] == [k], tag
        assert rec["dispatch_bytes"] == expect, tag
        assert rec["dispatch_rows"] == tokens * k, tag
        calls = rec["forward_calls"]
        # forward: this rank's tokens out (dispatch), their gate probs, expert outputs back (combine)
        assert [c["dim"] for c in calls] == [2, 1, 2], tag
        assert calls[0]["bytes"] == expect, f"{tag}: dispatch all-to-all moved {calls[0]['bytes']} bytes"
        assert calls[1]["bytes"] == tokens * k * elt, tag
        combine_total += calls[2]["bytes"]
        backward_total += sum(c["bytes"] for c in rec["backward_calls"] if c["dim"] == 2)
    # what comes back is what was sent, over all ranks; backward mirrors both token all-to-alls
    world = len(results)
    assert combine_total == world * expect
    assert backward_total == 2 * world * expect
