"""ElasticAlltoAllTokenDispatcher sizing: dropless output rows = tokens x k_l, capacity from
tokens x k_l, per-token top-p padded to the router's capacity."""

from __future__ import annotations

import pytest
import torch

from megatron.core.transformer.moe.moe_utils import get_capacity

from megatron_elastic.moe.schedules import KSampler

from moe_builders import (  # noqa: F401 (fixtures)
    BATCH,
    HIDDEN,
    SEQ,
    build_stack,
    capture_router_inputs,
    close,
    forward_backward,
    loss_weights,
    make_cfg,
    make_input,
    router_logits,
    fresh_moe_globals,
    single_process,
)


# ---------------------------------------------------------------------- 6. dispatcher sizing
@pytest.mark.parametrize("k_l", [1, 2, 3, 4])
def test_dropless_dispatch_is_sized_to_step_k(k_l):
    cfg = make_cfg({"elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 4})
    layers = build_stack(cfg)
    layer = layers[0]
    layer.router.sampler = KSampler("fixed", 1, 4, fixed_k=k_l)
    layers.train()
    forward_backward(layers, make_input(1), loss_weights(1))
    disp = layer.token_dispatcher
    tokens = SEQ * BATCH
    assert layer.config.moe_router_topk == 4  # what Megatron's dispatcher would size by
    assert disp.step_topk == k_l
    assert disp.num_out_tokens == tokens * k_l
    assert disp.last_dispatch_rows == tokens * k_l
    assert disp.last_dispatch_bytes == tokens * k_l * HIDDEN * 4


@pytest.mark.parametrize("k_l", [1, 2, 3])
def test_capacity_is_computed_from_step_k(k_l):
    cf, n = 1.0, 8
    tokens = SEQ * BATCH
    for pad in (False, True):
        cfg = make_cfg({"elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 4,
                        "model.moe_expert_capacity_factor": cf,
                        "model.moe_pad_expert_input_to_capacity": pad})
        layers = build_stack(cfg)
        layer = layers[0]
        layer.router.sampler = KSampler("fixed", 1, 4, fixed_k=k_l)
        layer.router.record_routing = True
        layers.train()
        forward_backward(layers, make_input(2), loss_weights(2))
        disp = layer.token_dispatcher
        cap = get_capacity(num_tokens=tokens * k_l, num_experts=n, capacity_factor=cf)
        assert cap != get_capacity(num_tokens=tokens * 4, num_experts=n, capacity_factor=cf)
        per_expert = layer.router.last_routing_map.sum(0)
        assert int(per_expert.max()) <= cap
        if pad:
            assert disp.capacity == cap
            assert disp.num_out_tokens == cap * n == disp.last_dispatch_rows
            assert (per_expert == cap).all()
        else:
            assert int(disp.num_out_tokens) == int(per_expert.sum()) == disp.last_dispatch_rows


def test_top_p_with_padded_capacity_uses_routers_capacity():
    """Per-token k + drop-and-pad: router and dispatcher agree on one capacity, sized from the
    static bound moe_router_topk (the mean k is rank-local, padded buffers must not be), whatever
    the capacity factor. (Before the fix the dispatcher guessed k from the padded map and, for
    cf != 1, used another capacity than the router: cf=0.5 silently dropped half the tokens.)"""
    n = 8
    tokens = SEQ * BATCH
    for cf in (0.5, 1.0, 1.5):
        cfg = make_cfg({"elastic.schedule": "top_p", "elastic.top_p": 0.5, "elastic.k_min": 1,
                        "elastic.k_max": 4, "model.moe_expert_capacity_factor": cf,
                        "model.moe_pad_expert_input_to_capacity": True, "model.init_method_std": 0.2})
        layers = build_stack(cfg)
        layer = layers[0]
        layer.router.record_routing = True
        inputs = capture_router_inputs(layers)
        layers.train()
        got = forward_backward(layers, make_input(4), loss_weights(4))
        r = layer.router
        assert r.last_k is None and r.last_mean_k < 4
        cap = get_capacity(num_tokens=tokens * 4, num_experts=n, capacity_factor=cf)
        assert (r.last_routing_map.sum(0) == cap).all()
        assert layer.token_dispatcher.capacity == cap, f"cf={cf}"
        # Output: each token's kept experts, gated by the router's probs (reference by hand).
        x = make_input(4)
        with torch.no_grad():
            probs, rmap = r.routing(router_logits(r, inputs[0][-1]).view(SEQ, BATCH, n))
            ref = torch.zeros(tokens, HIDDEN, device=x.device)
            flat = x.reshape(-1, HIDDEN)
            for e, expert in enumerate(layer.experts.local_experts):
                sel = rmap[:, e]
                if sel.any():
                    y, _ = expert(flat[sel], probs[sel, e])
                    ref[sel] += y
        close(got["out"].reshape(-1, HIDDEN), (flat + ref), 1e-6, 1e-5, f"cf={cf}")

