"""ElasticRouter on Megatron-core, one process: at a fixed k it is Megatron's TopKRouter (with
the all-to-all dispatcher, same weights -> same outputs, gradients, aux and z losses); at a step k
below moe_router_topk it equals a Megatron layer built with that k; the custom routing path
(candidate pool, top-p) reduces to Megatron's top-k when degenerate; in a GPTModel forward, k per
layer comes from the sampler, pools select k_l of each token's top k_ideal keyed by global token
id, top-p gives per-token k; load-balancing and hierarchical router loss values and gradients."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker, switch_load_balancing_loss_func
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron_elastic.models.gpt import transformer_config
from megatron_elastic.moe.dispatcher import ElasticAlltoAllTokenDispatcher
from megatron_elastic.moe.layer import ElasticMoELayer
from megatron_elastic.moe.router import ElasticRouter
from megatron_elastic.moe.routing_math import candidate_pool_size
from megatron_elastic.moe.schedules import KSampler

from moe_builders import (  # noqa: F401 (fixtures)
    BATCH,
    DEVICE,
    HIDDEN,
    SEQ,
    VOCAB,
    assert_runs_equal,
    build_small_model,
    build_stack,
    capture_router_inputs,
    check_top_p,
    close,
    forward_backward,
    loss_weights,
    make_cfg,
    make_input,
    model_forward,
    recording_routers,
    reset_moe_globals,
    router_logits,
    fresh_moe_globals,
    single_process,
)


# ---------------------------------------------------------------------- 1. equivalence
EQUIV_CASES = {
    "softmax_k2": {},
    "softmax_k1": {"model.moe_router_topk": 1, "model.moe_router_pre_softmax": True},
    "softmax_k3_zloss": {"model.moe_router_topk": 3, "model.moe_z_loss_coeff": 1e-3},
    "pre_softmax": {"model.moe_router_pre_softmax": True},
    "sigmoid_k2": {"model.moe_router_score_function": "sigmoid"},
    "capacity_drop": {"model.moe_expert_capacity_factor": 1.0},
    "capacity_pad": {"model.moe_expert_capacity_factor": 1.0, "model.moe_pad_expert_input_to_capacity": True},
}


@pytest.mark.parametrize("case", list(EQUIV_CASES))
def test_fixed_k_matches_megatron_topk_router_and_alltoall_dispatcher(case):
    cfg = make_cfg({"model.num_layers": 2, **EQUIV_CASES[case]})
    elastic = build_stack(cfg)
    plain = build_stack(cfg, plain=True)
    assert isinstance(elastic[0], ElasticMoELayer) and isinstance(elastic[0].router, ElasticRouter)
    assert isinstance(elastic[0].token_dispatcher, ElasticAlltoAllTokenDispatcher)
    assert type(plain[0]) is MoELayer and type(plain[0].router) is TopKRouter
    assert type(plain[0].token_dispatcher) is MoEAlltoAllTokenDispatcher
    plain.load_state_dict(elastic.state_dict())
    for mode in ("train", "eval"):
        elastic.train(mode == "train")
        plain.train(mode == "train")
        for step in range(2):
            elastic.elastic_context.set(step, 0, 0)
            x, w = make_input(step), loss_weights(step)
            reset_moe_globals()
            got = forward_backward(elastic, x, w)
            tracked = {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}
            reset_moe_globals()
            ref = forward_backward(plain, x, w)
            ref_tracked = {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}
            assert_runs_equal(got, ref, rel=1e-6, tag=f"{case} {mode} step {step}")
            assert got["last_k"] == [cfg.model.moe_router_topk] * 2
            # Everything Megatron tracks, identical; plus the k each layer used (training only).
            k_logged = tracked.pop("k", None)
            if mode == "train":
                close(k_logged, torch.full_like(k_logged, float(cfg.model.moe_router_topk)), 0, 0, "k")
            else:
                assert k_logged is None
            assert tracked.keys() == ref_tracked.keys()
            for name in ref_tracked:
                close(tracked[name], ref_tracked[name], 1e-7, 1e-6, name)
            if mode == "train":
                assert "load_balancing_loss" in ref_tracked
                if cfg.model.moe_z_loss_coeff:
                    assert "z_loss" in ref_tracked


@pytest.mark.parametrize("k_l", [1, 2, 3])
@pytest.mark.parametrize("capacity", [None, "drop", "pad"])
def test_step_k_matches_megatron_layer_built_with_that_topk(k_l, capacity):
    """k_l < moe_router_topk = k_max: the elastic layer is Megatron's layer built at topk = k_l."""
    extra = {}
    if capacity is not None:
        extra["model.moe_expert_capacity_factor"] = 1.0
        extra["model.moe_pad_expert_input_to_capacity"] = capacity == "pad"
    cfg = make_cfg({"elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 4, **extra})
    assert transformer_config(cfg).moe_router_topk == 4
    elastic = build_stack(cfg)
    router = elastic[0].router
    router.sampler = KSampler("fixed", 1, 4, fixed_k=k_l)
    plain = build_stack(cfg, plain=True, topk=k_l)
    plain.load_state_dict(elastic.state_dict())
    elastic.train()
    plain.train()
    x, w = make_input(3), loss_weights(3)
    got = forward_backward(elastic, x, w)
    ref = forward_backward(plain, x, w)
    assert_runs_equal(got, ref, rel=1e-6)
    assert got["last_k"] == [k_l]


@pytest.mark.parametrize("route", ["pool_ratio_1", "top_p_clipped"])
def test_custom_routing_path_reduces_to_megatron_topk(route):
    """The candidate-pool and top-p code paths (not Megatron's routing) give Megatron's top-k
    outputs, gradients and logged losses when the pool is the top-k (pool_ratio=1) or the top-p
    threshold is clipped to k_min = k_max = k."""
    k = 2
    if route == "pool_ratio_1":
        over = {"elastic.pool_ratio": 1.0}
    else:
        over = {"elastic.schedule": "top_p", "elastic.top_p": 0.3, "elastic.k_min": k, "elastic.k_max": k}
    cfg = make_cfg({"model.moe_router_topk": k, "model.moe_z_loss_coeff": 1e-3, **over})
    elastic = build_stack(cfg)
    plain = build_stack(cfg, plain=True)
    plain.load_state_dict(elastic.state_dict())
    elastic.train()
    plain.train()
    x, w = make_input(5), loss_weights(5)
    got = forward_backward(elastic, x, w)
    tracked = {k_: v["values"].clone() for k_, v in get_moe_layer_wise_logging_tracker().items()}
    reset_moe_globals()
    ref = forward_backward(plain, x, w)
    ref_tracked = {k_: v["values"].clone() for k_, v in get_moe_layer_wise_logging_tracker().items()}
    assert_runs_equal(got, ref, rel=1e-5)
    for name in ("load_balancing_loss", "z_loss"):
        close(tracked[name], ref_tracked[name], 1e-7, 1e-6, name)
    assert elastic[0].router.last_mean_k == k
    if route == "top_p_clipped":
        assert got["last_k"] == [None]  # decided per token...
        assert int(elastic[0].token_dispatcher.num_out_tokens) == SEQ * BATCH * k  # ...all at k


def test_training_k_per_layer_comes_from_sampler():
    cfg, model = build_small_model({"elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 4})
    routers = recording_routers(model)
    sampler = routers[0].sampler
    assert all(r.sampler is sampler for r in routers)
    model.train()
    seen = set()
    differs = False
    for it in range(6):
        for mb in range(2):
            model_forward(model, it, mb, offset=mb * BATCH)  # one data-parallel rank
            ks = [r.last_k for r in routers]
            assert ks == [sampler.k_for(it, mb, r.layer_number - 1) for r in routers]
            for r, k in zip(routers, ks):
                assert (r.last_routing_map.sum(-1) == k).all()
                assert r.last_routing_map.shape == (SEQ * BATCH, 8)
                assert r.last_mean_k == k
            seen.update(ks)
            differs |= ks[0] != ks[1]
    assert len(seen) >= 3 and differs, "schedule did not vary k across steps/layers"


@pytest.mark.parametrize("schedule", ["microbatch", "layerwise"])
def test_k_draw_is_keyed_by_global_microbatch(schedule):
    """A sample draws the same k whatever the data-parallel size: DP = 1 routes global
    micro-batch g as its local micro-batch g, DP = 2 as local micro-batch g // 2 on rank g % 2.
    (Keyed by the local index, DP = 2 would give samples of g = 1 the draw of g = 0.)"""
    cfg, model = build_small_model({"elastic.schedule": schedule, "elastic.k_min": 1, "elastic.k_max": 4})
    routers = recording_routers(model)
    model.train()
    local_keyed_would_differ = False
    for it in range(4):
        for g in range(4):
            model_forward(model, it, g, offset=g * BATCH)
            dp1 = [r.last_k for r in routers]
            model_forward(model, it, g // 2, offset=(g // 2) * 2 * BATCH + (g % 2) * BATCH)
            dp2 = [r.last_k for r in routers]
            assert dp1 == dp2 == [routers[0].sampler.k_for(it, g, r.layer_number - 1) for r in routers]
            local_keyed_would_differ |= dp1 != [routers[0].sampler.k_for(it, g // 2, r.layer_number - 1)
                                                for r in routers]
    assert local_keyed_would_differ, "draws never depend on the micro-batch: the test proves nothing"


def test_candidate_pool_selects_k_of_top_k_ideal():
    cfg, model = build_small_model({
        "elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 3, "elastic.pool_ratio": 2.0,
    })
    routers = recording_routers(model)
    inputs = capture_router_inputs([r_layer.mlp for r_layer in model.decoder.layers])
    model.train()
    outside_topk = 0
    maps = {}
    for it in range(4):
        model_forward(model, it)
        for li, r in enumerate(routers):
            k = r.last_k
            assert k == r.sampler.k_for(it, 0, li)
            k_ideal = candidate_pool_size(k, 2.0, 8)
            assert k_ideal == min(8, 2 * k)
            probs = torch.softmax(router_logits(r, inputs[li][-1]), dim=-1)
            rmap = r.last_routing_map
            assert (rmap.sum(-1) == k).all()
            pool = torch.zeros_like(rmap).scatter(1, probs.topk(k_ideal, dim=-1).indices, True)
            assert not (rmap & ~pool).any(), "an expert outside the token's top k_ideal was selected"
            topk = torch.zeros_like(rmap).scatter(1, probs.topk(k, dim=-1).indices, True)
            outside_topk += int((rmap & ~topk).any(-1).sum())
            maps[(it, li)] = rmap.clone()
    assert outside_topk > 0, "the pool never picked anything but the plain top-k"
    # Same coordinates -> same draw (stateless, resumable).
    model_forward(model, 2)
    assert all(torch.equal(r.last_routing_map, maps[(2, li)]) for li, r in enumerate(routers))


def test_candidate_pool_draw_is_keyed_by_global_token_id():
    """Sample 1 of a two-sample batch at offset 0 routes like the same sample alone at offset 1."""
    cfg, model = build_small_model({"elastic.schedule": "fixed", "model.moe_router_topk": 2, "elastic.pool_ratio": 3.0})
    routers = recording_routers(model)
    model.train()
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    model_forward(model, 5, 0, 0, tokens)
    both = [r.last_routing_map.view(SEQ, 2, -1)[:, 1].clone() for r in routers]
    model_forward(model, 5, 0, 1, tokens[1:])
    alone = [r.last_routing_map.view(SEQ, 1, -1)[:, 0].clone() for r in routers]
    for a, b in zip(both, alone):
        assert torch.equal(a, b)
    # ...and a different offset (another global token) draws differently.
    model_forward(model, 5, 0, 7, tokens[1:])
    other = [r.last_routing_map.view(SEQ, 1, -1)[:, 0].clone() for r in routers]
    assert any(not torch.equal(a, b) for a, b in zip(alone, other))


def test_top_p_training_per_token_k():
    cfg, model = build_small_model({
        "elastic.schedule": "top_p", "elastic.top_p": 0.5, "elastic.k_min": 1, "elastic.k_max": 4,
        "model.init_method_std": 0.2,
    })
    routers = recording_routers(model)
    inputs = capture_router_inputs([layer.mlp for layer in model.decoder.layers])
    model.train()
    model_forward(model, 0)
    k_tok = check_top_p(routers, inputs, 0.5, 1, 4)
    assert len(set(k_tok.tolist())) > 1, "top-p did not vary k across tokens"
    disp = model.decoder.layers[-1].mlp.token_dispatcher
    assert int(disp.num_out_tokens) == int(k_tok.sum()) == disp.last_dispatch_rows


# ---------------------------------------------------------------------- 3. losses
def _lb_reference(logits, rmap, k, coeff, n):
    scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return switch_load_balancing_loss_func(
        probs=scores, tokens_per_expert=rmap.sum(0), total_num_tokens=logits.shape[0], topk=k,
        num_experts=n, moe_aux_loss_coeff=coeff,
    ) / coeff


@pytest.mark.parametrize("pool", [None, 2.0])
def test_load_balancing_and_router_loss_values_at_variable_k(pool):
    coeff, lam, n = 0.01, 0.5, 8
    cfg = make_cfg({"model.num_layers": 2, "elastic.schedule": "layerwise", "elastic.k_min": 1,
                    "elastic.k_max": 4, "elastic.pool_ratio": pool, "elastic.router_loss_coeff": lam,
                    "model.moe_aux_loss_coeff": coeff, "model.init_method_std": 0.3})
    layers = build_stack(cfg)
    routers = [layer.router for layer in layers]
    for r in routers:
        r.record_routing = True
    inputs = capture_router_inputs(layers)
    layers.train()
    ks_seen = set()
    for it in range(5):
        layers.elastic_context.set(it, 0, 0)
        reset_moe_globals()
        forward_backward(layers, make_input(it), loss_weights(it))
        tracker = get_moe_layer_wise_logging_tracker()
        for li, r in enumerate(routers):
            k = r.last_k
            ks_seen.add(k)
            logits = router_logits(r, inputs[li][-1])
            if pool is None:
                rmap = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter(1, logits.topk(k, dim=-1).indices, True)
                assert torch.equal(rmap, r.last_routing_map)
            else:
                rmap = r.last_routing_map  # the sampled experts are what gets balanced
            expect = _lb_reference(logits, rmap, k, coeff, n)
            got = tracker["load_balancing_loss"]["values"][li]
            close(got, expect, 1e-6, 1e-5, f"LB loss layer {li} at k={k}")
            if k != 4:  # normalising by moe_router_topk=k_max would have been visibly wrong
                assert not torch.isclose(got, _lb_reference(logits, rmap, 4, coeff, n), rtol=1e-3)
            p = torch.softmax(logits, dim=-1)
            h_minus_log_n = (-(p * p.log()).sum(-1) - math.log(n)).mean()
            close(tracker["hierarchical_router_loss"]["values"][li], h_minus_log_n, 1e-6, 1e-5,
                  f"hierarchical router loss layer {li}")
            assert -math.log(n) <= float(h_minus_log_n) <= 0
    assert len(ks_seen) >= 3


def test_router_loss_gradient_is_coeff_times_direct_gradient():
    lam = 0.7
    cfg = make_cfg({"elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 4,
                    "elastic.router_loss_coeff": lam, "model.init_method_std": 0.3})
    layers = build_stack(cfg)
    router = layers[0].router
    layers.train()
    layers.elastic_context.set(3, 1, 0)
    x, w = make_input(11), loss_weights(11)
    with_loss = forward_backward(layers, x, w)
    router.router_loss_coeff = 0.0
    without = forward_backward(layers, x, w)
    assert with_loss["last_k"] == without["last_k"]
    close(with_loss["out"], without["out"], 0, 0, "the router loss must not change the forward")

    # Direct formula: mean_t(H(p_t) - log N), p = softmax(x W^T); autograd w.r.t. W and x.
    xd = x.detach().clone().requires_grad_(True)
    wd = router.weight.detach().clone().requires_grad_(True)
    p = torch.softmax(xd.reshape(-1, HIDDEN) @ wd.t(), dim=-1)
    direct = (-(p * p.log()).sum(-1) - math.log(8)).mean()
    gw, gx = torch.autograd.grad(direct, [wd, xd])
    close(with_loss["router_grads"][0] - without["router_grads"][0], lam * gw, 1e-6, 1e-4, "router weight grad")
    close(with_loss["x_grad"] - without["x_grad"], lam * gx, 1e-6, 1e-4, "input grad")
    assert float(gw.abs().max()) > 1e-4  # the check is not vacuous
    # Expert weights do not see the router loss.
    for name in with_loss["expert_grads"]:
        close(with_loss["expert_grads"][name], without["expert_grads"][name], 1e-7, 1e-5, name)


class _FakeTPGroup:
    """Stands in for a tensor-parallel group of ``size`` ranks as seen from ``rank``."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def test_pool_token_ids_under_sequence_parallel_match_tp1():
    """With TP > 1 (sequence parallel) a router sees the tp_rank-th chunk of the sequence; its
    global token ids, hence its pool draws, must be those of the same tokens in a TP = 1 run
    (before the fix both TP ranks reused ids 0..S/tp-1 for different tokens)."""
    cfg = make_cfg({"model.moe_router_topk": 2, "elastic.pool_ratio": 3.0})
    layers = build_stack(cfg)
    router = layers[0].router
    router.train()
    router.context.set(4, 0, 6)
    logits = torch.randn(SEQ, BATCH, 8, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    full_ids = router._token_ids(SEQ, BATCH, DEVICE).view(SEQ, BATCH).cpu()
    _, full_map = router.routing(logits)
    full_map = full_map.view(SEQ, BATCH, 8)
    assert torch.equal(full_ids, (torch.arange(BATCH) + 6) * SEQ + torch.arange(SEQ).unsqueeze(1))

    router.config = copy.copy(router.config)
    router.config.sequence_parallel = True
    real_group = router.tp_group
    try:
        for tp in (2, 4):
            chunk = SEQ // tp
            ids, maps = [], []
            for rank in range(tp):
                router.tp_group = _FakeTPGroup(rank, tp)
                ids.append(router._token_ids(chunk, BATCH, DEVICE).view(chunk, BATCH).cpu())
                _, m = router.routing(logits[rank * chunk:(rank + 1) * chunk])
                maps.append(m.view(chunk, BATCH, 8))
            assert torch.equal(torch.cat(ids), full_ids), f"tp={tp}"
            assert torch.equal(torch.cat(maps), full_map), f"tp={tp}"
    finally:
        router.tp_group = real_group
