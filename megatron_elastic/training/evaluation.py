"""The one evaluation loop: forward without gradients over validation batches.

Used by training (validation loss at ``eval_interval`` and at the end) and by the elastic
evaluation (``eval/elastic_eval.py``: the same loss at every inference k', plus the routing each
forward recorded). The loss is token-weighted: the sum of per-token losses under the loss mask
over the number of counted tokens, summed over data-parallel ranks, so the number does not depend
on how the batch is split into micro-batches or ranks.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_elastic.device import policy

# on_forward(per_token_loss [b, s], batch) after each micro-batch's forward
ForwardHook = Callable[[torch.Tensor, dict], None]


def evaluation_loss_sums(model, reader, iterations: int, context, iteration_base: int = 0,
                         train_mode: bool = False, on_forward: Optional[ForwardHook] = None) -> torch.Tensor:
    """``[sum of masked per-token losses, number of masked tokens]`` (float64, this rank).

    Batch (it, mb) of ``reader`` is scored under step coordinates (iteration_base + it, mb), so
    routers that draw per step (training routing, ``train_mode=True``) draw what training would;
    with ``train_mode=False`` (the default) routers use the model's inference k. The model's
    train/eval mode is restored afterwards and Megatron's aux-loss tracker is cleared (the
    forwards must not leak into the next training log line).
    """
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    sums = torch.zeros(2, dtype=torch.float64)
    was_training = model.training
    model.train(train_mode)
    try:
        with torch.no_grad():
            for it in range(iterations):
                for mb in range(reader.num_microbatches):
                    context.set(iteration_base + it, mb, reader.sample_offset(mb))
                    batch = policy().to_device(reader.get(iteration_base + it, mb))
                    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
                    mask = batch["loss_mask"].to(per_token.device).float()
                    sums[0] += float((per_token.float() * mask).sum())
                    sums[1] += float(mask.sum())
                    if on_forward is not None:
                        on_forward(per_token, batch)
    finally:
        model.train(was_training)
        clear_aux_losses_tracker()
    return sums


def evaluate(model, reader, iterations: int, context, iteration_base: int = 0) -> float:
    """Token-weighted mean validation loss over ``iterations`` global batches, all DP ranks."""
    from megatron.core import parallel_state as ps

    sums = evaluation_loss_sums(model, reader, iterations, context, iteration_base)
    if dist.is_initialized():
        dist.all_reduce(sums, group=ps.get_data_parallel_group())
    return float(sums[0] / sums[1].clamp(min=1.0))
