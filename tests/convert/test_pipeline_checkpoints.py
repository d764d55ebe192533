"""Checkpoints of pipeline-parallel runs (PP 2 x EP 2 and TP 2 x PP 2, 4 gloo ranks each) reload
under another layout and export to Hugging Face: resumed in one process (and the reverse: a
one-process save resumed under PP 2 x EP 2) the loss trajectory continues the uninterrupted run's;
the export holds every layer and expert, and transformers' logits equal the Megatron model's.

Megatron-core's distributed checkpoints store global tensors (a stage's layer i at global layer
offset + i, an EP rank's experts at their global indices), so the load of another layout reads
the slices its own template asks for; the optimizer state is keyed by the same tensors.
"""

from __future__ import annotations

import json
import re

import pytest

from conversion_helpers import K_CHECKS, SMOKE, TOL, VOCAB, hf_model_logits, megatron_model_logits, read_safetensors
from helpers import run_distributed, tiny_overrides, train_run

pytestmark = pytest.mark.slow

# EMoE (fixed k, candidate pool keyed by global token ids, router loss): draws that do not depend
# on the data-parallel size, which differs between the layouts (4 ranks / PP 2 = DP 2).
ELASTIC = {"elastic.schedule": "fixed", "elastic.k_min": 2, "elastic.k_max": 2,
           "elastic.pool_ratio": 1.5, "elastic.router_loss_coeff": 1e-3}
PP2_EP2 = {"parallel.pipeline_model_parallel_size": 2, "parallel.expert_model_parallel_size": 2}
ONE = {"parallel.pipeline_model_parallel_size": 1, "parallel.expert_model_parallel_size": 1}


def _overrides(data, tmp_path, ckpt, layout: dict) -> list:
    # micro-batch 1: two micro-batches per data-parallel rank fill the two stages.
    return tiny_overrides(data, tmp_path, **ELASTIC, **layout, **{
        "model.init_method_std": 0.2, "train.micro_batch_size": 1, "train.global_batch_size": 4,
        "train.train_iters": 6, "train.lr_warmup_iters": 2, "checkpoint.save": str(ckpt),
        "checkpoint.load": str(ckpt)})


def resume_and_read_back(rank, world_size, overrides, saved_iteration_dir):
    """Resume per ``overrides`` (one process), then load ``saved_iteration_dir`` alone into a fresh
    one-process model and return its logits per k' (the Megatron side of the export check)."""
    from megatron_elastic import parallel
    from megatron_elastic.config import load_config
    from megatron_elastic.models.gpt import build_model
    from megatron_elastic.train import run
    from megatron_elastic.training.checkpoint import load_checkpoint

    cfg = load_config(SMOKE, overrides)
    try:
        result = run(cfg)
        model = build_model(cfg, VOCAB)
        load_checkpoint(saved_iteration_dir, model, None, cfg, finetune=True)
        logits = {json.dumps(k): megatron_model_logits(model, k) for k in K_CHECKS}
    finally:
        parallel.destroy()
    return {"losses": result.losses, "iteration": result.iteration, "logits": logits}


@pytest.fixture(scope="module")
def uninterrupted(smoke_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    return run_distributed(train_run, 1, _overrides(smoke_data, tmp, tmp / "ckpt", ONE), tmp_dir=tmp)[0]


def test_pipeline_expert_parallel_save_resumes_in_one_process_and_exports(smoke_data, tmp_path, uninterrupted):
    from transformers import AutoModelForCausalLM

    from megatron_elastic.convert.to_hf import convert_megatron_to_hf

    ckpt = tmp_path / "moved"
    first = run_distributed(train_run, 4, _overrides(smoke_data, tmp_path, ckpt, PP2_EP2), 3, tmp_dir=tmp_path)
    assert all(r["iteration"] == 3 for r in first)
    saved = ckpt / "iter_0000003"
    second = run_distributed(resume_and_read_back, 1, _overrides(smoke_data, tmp_path, ckpt, ONE), str(saved),
                             tmp_dir=tmp_path)[0]
    assert second["iteration"] == 6
    for rank in first:  # every rank of the pipeline reports the last stage's losses
        assert rank["losses"] + second["losses"] == pytest.approx(uninterrupted["losses"], abs=1e-5), (
            rank["losses"], second["losses"], uninterrupted["losses"])

    # The PP 2 x EP 2 save exports with every layer (one per stage) and expert (two per EP rank).
    out = tmp_path / "hf"
    result = convert_megatron_to_hf(saved, out, progress=False)
    assert result.iteration == 3 and result.experts_per_layer == [4, 4]
    tensors = read_safetensors(out)
    experts = {(int(m[1]), int(m[2])) for n in tensors
               if (m := re.match(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w1\.weight$", n))}
    assert experts == {(i, j) for i in range(2) for j in range(4)}
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    megatron = second["logits"]
    for k in K_CHECKS:
        diff = float((hf_model_logits(model, k) - megatron[json.dumps(k)]).abs().max())
        assert diff < TOL, (k, diff)
    # The check can fail: another k' moves the logits far beyond the tolerance.
    assert (megatron[json.dumps(1)] - megatron[json.dumps(None)]).abs().max() > 100 * TOL


def test_one_process_save_resumes_under_pipeline_expert_parallel(smoke_data, tmp_path, uninterrupted):
    ckpt = tmp_path / "moved"
    first = run_distributed(train_run, 1, _overrides(smoke_data, tmp_path, ckpt, ONE), 3, tmp_dir=tmp_path)[0]
    assert first["iteration"] == 3
    second = run_distributed(train_run, 4, _overrides(smoke_data, tmp_path, ckpt, PP2_EP2), tmp_dir=tmp_path)
    for rank in second:
        assert rank["iteration"] == 6
        assert first["losses"] + rank["losses"] == pytest.approx(uninterrupted["losses"], abs=1e-5), (
            first["losses"], rank["losses"], uninterrupted["losses"])


def test_tensor_parallel_pipeline_save_resumes_in_one_process(smoke_data, tmp_path, uninterrupted):
    """TP 2 (sequence parallel) x PP 2 trains on CPU too, and its tensor-parallel shards of each
    stage's layers reload whole in one process."""
    layout = {"parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": "true",
              "parallel.pipeline_model_parallel_size": 2}
    ckpt = tmp_path / "moved"
    first = run_distributed(train_run, 4, _overrides(smoke_data, tmp_path, ckpt, layout), 3, tmp_dir=tmp_path)
    second = run_distributed(train_run, 1, _overrides(smoke_data, tmp_path, ckpt, ONE), tmp_dir=tmp_path)[0]
    assert second["iteration"] == 6
    for rank in first:
        assert rank["losses"] + second["losses"] == pytest.approx(uninterrupted["losses"], abs=1e-5), (
            rank["losses"], second["losses"], uninterrupted["losses"])
