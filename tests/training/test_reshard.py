"""Checkpoints reload under another layout (Megatron-core's distributed checkpoints reshard on
load): a run saved under expert parallel 2 and resumed in one process (and the reverse) continues
the uninterrupted run's loss trajectory, optimizer state included."""

from __future__ import annotations

import pytest

from helpers import run_distributed, tiny_overrides, train_run

pytestmark = pytest.mark.slow

# M-MoE layer-wise k with an EMoE candidate pool and the router loss: k draws are keyed by the
# global micro-batch and pool draws by global token ids (moe/context.py), so both are the same
# under any data-parallel size and the resumed run can match the uninterrupted one exactly.
ELASTIC = {"elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 2,
           "elastic.pool_ratio": 2.0, "elastic.router_loss_coeff": 1e-3}


def _overrides(data, tmp_path, ckpt, ep: int) -> list:
    return tiny_overrides(data, tmp_path, **ELASTIC, **{
        "train.train_iters": 6, "train.lr_warmup_iters": 2, "checkpoint.save": str(ckpt),
        "checkpoint.load": str(ckpt), "parallel.expert_model_parallel_size": ep})


@pytest.mark.parametrize("first_ep, second_ep", [(2, 1), (1, 2)])
def test_resume_under_another_expert_parallel_layout(smoke_data, tmp_path, first_ep, second_ep):
    full = run_distributed(train_run, 1, _overrides(smoke_data, tmp_path, tmp_path / "full", 1),
                           tmp_dir=tmp_path)[0]
    ckpt = tmp_path / "moved"
    first = run_distributed(train_run, first_ep, _overrides(smoke_data, tmp_path, ckpt, first_ep), 3,
                            tmp_dir=tmp_path)
    assert first[0]["iteration"] == 3
    second = run_distributed(train_run, second_ep, _overrides(smoke_data, tmp_path, ckpt, second_ep),
                             tmp_dir=tmp_path)
    assert second[0]["iteration"] == 6
    # Every rank of the second layout sees the same (data-parallel-averaged) losses.
    for rank in second:
        assert first[0]["losses"] + rank["losses"] == pytest.approx(full["losses"], abs=1e-5), (first[0]["losses"], rank["losses"], full["losses"])
