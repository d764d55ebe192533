"""GPU only: elastic routing adds no host synchronisation to Megatron-core's router.

A host sync per MoE layer stalls the CPU that queues the next kernels; on CPU there is no such
thing to count, so these skip without CUDA (CI). CUDA's sync debug mode warns at every
synchronising call; the elastic router, in each training mode, must not warn more often than
Megatron-core's ``TopKRouter`` at the same k on the same input.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from moe_builders import (  # noqa: F401 (fixtures)
    build_stack,
    fresh_moe_globals,
    make_cfg,
    make_input,
    single_process,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _syncs(layers, x: torch.Tensor) -> int:
    """Synchronising CUDA calls in one router forward + backward (after a warm-up pass)."""
    router = layers[0].router.train()
    context = getattr(layers, "elastic_context", None)
    for step in range(2):
        if context is not None:
            context.set(step, 0, 0)
        inp = x.detach().requires_grad_(True)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn" if step else "default")
            try:
                probs, _ = router(inp)
                probs.float().sum().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("over", [
    {},  # fixed k = 2
    {"elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 4},
    {"elastic.pool_ratio": 2.0},
    {"elastic.pool_ratio": 2.0, "elastic.router_loss_coeff": 0.01},
], ids=["fixed", "layerwise", "pool", "pool_router_loss"])
def test_elastic_router_syncs_no_more_than_megatrons(over):
    x = make_input(0)
    stock = _syncs(build_stack(make_cfg(), plain=True), x)
    elastic = _syncs(build_stack(make_cfg(over)), x)
    assert elastic <= stock, f"elastic router: {elastic} synchronising calls, Megatron's TopKRouter: {stock}"
