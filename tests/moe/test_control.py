"""Inference control (moe/control.py): set_inference_k with a global k', a per-layer budget or
top-p, and the defaults (the training k; elastic.eval_k)."""

from __future__ import annotations

import pytest
import torch

from megatron_elastic.moe.control import inference_k, set_inference_k

from moe_builders import (  # noqa: F401 (fixtures)
    build_small_model,
    capture_router_inputs,
    check_top_p,
    model_forward,
    recording_routers,
    router_logits,
    fresh_moe_globals,
    single_process,
)


def test_eval_k_from_set_inference_k_and_defaults():
    cfg, model = build_small_model({"elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 4,
                         "elastic.pool_ratio": 2.0, "model.init_method_std": 0.5})
    routers = recording_routers(model)
    inputs = capture_router_inputs([layer.mlp for layer in model.decoder.layers])
    model.eval()

    def check_topk(ks):
        for li, (r, k) in enumerate(zip(routers, ks)):
            assert r.last_k == k
            probs = torch.softmax(router_logits(r, inputs[li][-1]), dim=-1)
            expect = torch.zeros_like(r.last_routing_map).scatter(1, probs.topk(k, dim=-1).indices, True)
            assert torch.equal(r.last_routing_map, expect), "eval must route to the plain top-k (no pool)"

    # Default for a varying schedule: k_max everywhere.
    assert inference_k(model) == [4, 4]
    model_forward(model, 0)
    check_topk([4, 4])
    set_inference_k(model, 3)
    assert inference_k(model) == [3, 3]
    model_forward(model, 1)
    check_topk([3, 3])
    set_inference_k(model, [1, 4])
    assert inference_k(model) == [1, 4]
    model_forward(model, 2)
    check_topk([1, 4])
    set_inference_k(model, top_p=0.5)
    assert inference_k(model) == [None, None]
    model_forward(model, 3)
    check_top_p(routers, inputs, 0.5, 1, 4)
    # Training forwards ignore the inference setting.
    model.train()
    model_forward(model, 4)
    assert [r.last_k for r in routers] == [routers[0].sampler.k_for(4, 0, i) for i in range(2)]
    model.eval()
    set_inference_k(model, None)
    model_forward(model, 5)
    check_topk([4, 4])
    with pytest.raises(ValueError):
        set_inference_k(model, [1, 2, 3])
    with pytest.raises(ValueError):
        set_inference_k(model, 9)


def test_eval_default_is_training_k_for_fixed_schedule_and_config_eval_k():
    cfg, model = build_small_model({"elastic.schedule": "fixed", "model.moe_router_topk": 3})
    routers = recording_routers(model)
    assert inference_k(model) == [3, 3]
    model.eval()
    model_forward(model, 0)
    assert [r.last_k for r in routers] == [3, 3]
    # fixed with an explicit k_min == k_max != model.moe_router_topk (a valid config; used to
    # raise "fixed_k=2 outside [k_min, k_max]=[3, 3]" in attach_elastic): trains and evals at 3.
    cfg, model = build_small_model({"elastic.schedule": "fixed", "model.moe_router_topk": 2,
                         "elastic.k_min": 3, "elastic.k_max": 3})
    routers = recording_routers(model)
    assert inference_k(model) == [3, 3]
    model.train()
    model_forward(model, 0)
    assert [r.last_k for r in routers] == [3, 3]
    model.eval()
    model_forward(model, 1)
    assert [r.last_k for r in routers] == [3, 3]
    cfg, model = build_small_model({"elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 4,
                         "elastic.eval_k": "[2, 1]"})
    routers = recording_routers(model)
    assert inference_k(model) == [2, 1]
    model.eval()
    model_forward(model, 0)
    assert [r.last_k for r in routers] == [2, 1]

