"""GPU-only paths: bf16, Megatron-core's distributed optimizer, the TE spec when installed.

Skipped without CUDA (CI has none). On a GPU machine: ``python -m pytest -m gpu``.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import REPO, run_distributed, tiny_overrides

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _train_gpu(rank, world_size, overrides):
    from megatron_elastic import parallel
    from megatron_elastic.config import load_config
    from megatron_elastic.device import policy
    from megatron_elastic.train import run
    from megatron_elastic.training.optim import MegatronOptimizer

    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides)
    try:
        result = run(cfg)
    finally:
        parallel.destroy()
    return {"losses": result.losses, "te": policy().use_te_spec, "optimizer": MegatronOptimizer.__name__}


def test_bf16_distributed_optimizer_trains(smoke_data, tmp_path):
    overrides = tiny_overrides(smoke_data, tmp_path, **{
        "train.train_iters": 8, "train.bf16": "true", "train.use_distributed_optimizer": "true",
        "elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 2,
        "elastic.pool_ratio": 2.0,
    })
    (out,) = run_distributed(_train_gpu, 1, overrides, tmp_dir=tmp_path)
    losses = out["losses"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
