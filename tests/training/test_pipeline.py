"""Pipeline parallelism through Megatron-core's schedules: the same model, data and weights give
the same losses under one stage (no pipelining), two stages (1F1B) and two stages of two virtual
chunks each (interleaved 1F1B), for a fixed k and for layer-wise elastic k with a candidate pool
(validated at a per-layer inference k list); a virtual-stage checkpoint resumes in one process.
PP x EP / TP x PP checkpoints and their export: tests/convert/test_pipeline_checkpoints.py."""

from __future__ import annotations

import pytest

from helpers import run_distributed, tiny_overrides, train_run

pytestmark = pytest.mark.slow

# M-MoE layer-wise k in [1, 2] drawn per (iteration, micro-batch, global layer) + an EMoE
# candidate pool and the router loss (configs/elastic_combined.yaml's kind of recipe).
LAYERWISE = {"elastic.schedule": "layerwise", "elastic.k_min": 1, "elastic.k_max": 2,
             "elastic.pool_ratio": 2.0, "elastic.router_loss_coeff": 1e-3}
FIXED = {"elastic.schedule": "fixed", "elastic.k_min": 2, "elastic.k_max": 2}


def _overrides(data, tmp_path, elastic: dict, layers: int, pp: int, vp=None) -> list:
    if elastic is LAYERWISE:
        # Validation runs at a per-layer inference k: each stage must read its own layers'
        # entries of the global list (read by local position, stage 1 would take layer 1's k).
        elastic = {**elastic, "elastic.eval_k": "[2,1]" if layers == 2 else "[2,1,1,2]"}
    # init std 0.2 (not 0.02): expert outputs large enough that another k moves the loss by far
    # more than the tolerance, so a stage that drew or read another layer's k would fail.
    return tiny_overrides(data, tmp_path, **elastic, **{
        "model.init_method_std": 0.2, "model.num_layers": layers, "train.train_iters": 3, "train.eval_iters": 1,
        "parallel.pipeline_model_parallel_size": pp,
        "parallel.virtual_pipeline_model_parallel_size": "null" if vp is None else vp})


@pytest.mark.parametrize("elastic", [FIXED, LAYERWISE], ids=["fixed_k", "layerwise_pool"])
def test_two_stages_match_one(smoke_data, tmp_path, elastic):
    one = run_distributed(train_run, 1, _overrides(smoke_data, tmp_path, elastic, 2, 1),
                          tmp_dir=tmp_path)[0]
    two = run_distributed(train_run, 2, _overrides(smoke_data, tmp_path, elastic, 2, 2),
                          tmp_dir=tmp_path)
    assert len(one["losses"]) == 3
    for rank in two:  # every stage reports the last stage's losses
        assert rank["losses"] == pytest.approx(one["losses"], abs=1e-5), (rank["losses"], one["losses"])
        assert rank["valid"] == pytest.approx(one["valid"], abs=1e-5)


@pytest.mark.parametrize("elastic", [FIXED, LAYERWISE], ids=["fixed_k", "layerwise_pool"])
def test_interleaved_virtual_stages_match_one_stage(smoke_data, tmp_path, elastic):
    one = run_distributed(train_run, 1, _overrides(smoke_data, tmp_path, elastic, 4, 1),
                          tmp_dir=tmp_path)[0]
    two = run_distributed(train_run, 2, _overrides(smoke_data, tmp_path, elastic, 4, 2, vp=2),
                          tmp_dir=tmp_path)
    for rank in two:
        assert rank["losses"] == pytest.approx(one["losses"], abs=1e-5), (rank["losses"], one["losses"])
        assert rank["valid"] == pytest.approx(one["valid"], abs=1e-5)


def test_virtual_stage_checkpoint_resumes_in_one_process(smoke_data, tmp_path):
    """A save under PP 2 x VP 2 (two model chunks per rank, stored as model0/model1 with global
    layer offsets) resumes in one process on the uninterrupted run's trajectory."""
    def overrides(ckpt, pp, vp):
        return _overrides(smoke_data, tmp_path, FIXED, 4, pp, vp) + [
            "train.train_iters=6", f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}"]

    full = run_distributed(train_run, 1, overrides(tmp_path / "full", 1, None), tmp_dir=tmp_path)[0]
    ckpt = tmp_path / "moved"
    first = run_distributed(train_run, 2, overrides(ckpt, 2, 2), 3, tmp_dir=tmp_path)
    second = run_distributed(train_run, 1, overrides(ckpt, 1, None), tmp_dir=tmp_path)[0]
    assert second["iteration"] == 6
    for rank in first:
        assert rank["losses"] + second["losses"] == pytest.approx(full["losses"], abs=1e-5), (
            rank["losses"], second["losses"], full["losses"])
