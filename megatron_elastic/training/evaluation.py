"""The one evaluation loop: forward without gradients over validation batches.

Used by training (validation loss at ``eval_interval`` and at the end) and by the elastic
evaluation (``eval/elastic_eval.py``: the same loss at every inference k', plus the routing each
forward recorded). The loss is token-weighted: the sum of per-token losses under the loss mask
over the number of counted tokens, summed over data-parallel ranks, so the number does not depend
on how the batch is split into micro-batches or ranks.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_elastic.device import policy
from megatron_elastic.training.schedule import ForwardHook  # noqa: F401 (re-exported)


def evaluation_loss_sums(model, reader, iterations: int, context, iteration_base: int = 0,
                         train_mode: bool = False, on_forward: Optional[ForwardHook] = None) -> torch.Tensor:
    """``[sum of masked per-token losses, number of masked tokens]`` (float64, this rank).

    ``model`` is one module or this rank's list of pipeline model chunks; the forwards run
    through Megatron's pipeline schedule (forward only), and under pipeline parallelism the
    sums, which the last stage computes, are shared with every stage (``on_forward`` runs on the
    last stage only). Batch (it, mb) of ``reader`` is scored under step coordinates
    (iteration_base + it, mb), so routers that draw per step (training routing,
    ``train_mode=True``) draw what training would; with ``train_mode=False`` (the default)
    routers use the model's inference k. The model's train/eval mode is restored afterwards and
    Megatron's aux-loss tracker is cleared (the forwards must not leak into the next training
    log line).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    from megatron_elastic.training.schedule import PipelineStep, as_chunks

    chunks = as_chunks(model)
    was_training = [c.training for c in chunks]
    for c in chunks:
        c.train(train_mode)
    try:
        with torch.no_grad():
            sums = PipelineStep(chunks, reader).evaluation_sums(
                iterations, context, iteration_base, on_forward)
    finally:
        for c, mode in zip(chunks, was_training):
            c.train(mode)
        clear_aux_losses_tracker()
    if dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        # Reduced on the device: NCCL groups take device tensors only.
        on_device = sums.to(policy().device)
        dist.all_reduce(on_device, group=ps.get_pipeline_model_parallel_group())
        sums = on_device.cpu()
    return sums


def evaluate(model, reader, iterations: int, context, iteration_base: int = 0) -> float:
    """Token-weighted mean validation loss over ``iterations`` global batches, all DP ranks."""
    from megatron.core import parallel_state as ps

    sums = evaluation_loss_sums(model, reader, iterations, context, iteration_base)
    if dist.is_initialized():
        sums = sums.to(policy().device)  # NCCL groups take device tensors only
        dist.all_reduce(sums, group=ps.get_data_parallel_group())
    return float(sums[0] / sums[1].clamp(min=1.0))
