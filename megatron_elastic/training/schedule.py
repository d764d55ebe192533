"""One iteration's micro-batches through Megatron-core's pipeline schedules.

``get_forward_backward_func`` picks the schedule from the parallel state: no pipelining for one
stage, 1F1B for ``pipeline_model_parallel_size`` > 1, interleaved 1F1B when the rank holds several
model chunks (``virtual_pipeline_model_parallel_size``). The same code path runs every layout, so
a one-stage run and a pipelined run of the same model compute the same losses.

What the schedule is given here:

* ``forward_step_func`` reads micro-batch ``mb`` of the iteration by address (``BatchReader``:
  deterministic, whatever the layout), sets the chunk's elastic step context (iteration,
  micro-batch, sample offset) right before that chunk's forward, so every stage's routers draw
  the k and pools a one-stage run draws for the same global layers, and runs the chunk: the first
  stage embeds tokens, later stages take the activations the schedule received.
* the loss function (last stage only): the mean per-token loss over the loss mask of the
  micro-batch; the schedule divides it by the number of micro-batches and sets
  ``MoEAuxLossAutoScaler`` to 1/num_microbatches, so the gradient is that of the mean over
  micro-batches, aux losses included. The loss' value is added to a device tensor (no host
  sync per micro-batch); other stages' sums stay 0.
* ``finalize_model_grads_func``: first ``before_finalize(loss_sum)`` (the trainer folds the
  loss' finiteness into a gradient there, before any reduction), then Megatron's
  ``finalize_model_grads`` (data-parallel reduction, sequence-parallel norm gradients, embedding
  gradients across stages).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, List, Optional, Sequence

import torch

from megatron_elastic.device import policy

# on_forward(per_token_loss [b, s], batch) after each micro-batch's forward, on the last stage
ForwardHook = Callable[[torch.Tensor, dict], None]


def masked_mean_loss(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """One micro-batch's training loss: the mean per-token loss over the loss mask (pad and, for
    chat data, prompt positions carry 0)."""
    mask = loss_mask.float()
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)


def tensor_parallel_sequence_chunk(t: torch.Tensor, s_local: int) -> torch.Tensor:
    """This tensor-parallel rank's part of a ``[b, s]`` tensor's sequence, as sequence
    parallelism splits the hidden states: the rank-th contiguous chunk of ``s_local``."""
    from megatron.core import parallel_state as ps

    start = ps.get_tensor_model_parallel_rank() * s_local
    return t[:, start:start + s_local].contiguous()


def as_chunks(model) -> List[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def unwrapped(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside a DDP wrapper (or the chunk itself)."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(chunk)


def configure_grad_sync(chunks: Sequence[torch.nn.Module]) -> None:
    """Tell the schedules how to suspend DDP's gradient reduction between micro-batches (one
    ``no_sync`` per chunk under the interleaved schedule, as Megatron-LM sets it)."""
    from megatron.core.utils import get_model_config

    config = get_model_config(chunks[0])
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync


class PipelineStep:
    """Runs an iteration's micro-batches of ``reader`` through ``model`` (one module or this
    rank's list of model chunks, DDP-wrapped for training) with Megatron's schedule."""

    def __init__(self, model, reader, micro_batch_size: Optional[int] = None):
        self.chunks = as_chunks(model)
        self.reader = reader
        self.micro_batch_size = micro_batch_size or reader.mbs
        self._first_batch: Optional[dict] = None

    # ------------------------------------------------------------------ helpers
    def _data_sample(self) -> dict:
        """The data's first micro-batch, read once: what every batch's shape and keys are."""
        if self._first_batch is None:
            self._first_batch = self.reader.get(0, 0)
        return self._first_batch

    def seq_length(self) -> int:
        """Sequence length of the data (the shape of the activations passed between stages)."""
        return int(self._data_sample()["tokens"].shape[1])

    def _run(self, forward_step_func, forward_only: bool, num_microbatches: int) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        get_forward_backward_func()(
            forward_step_func=forward_step_func,
            data_iterator=[iter(range(num_microbatches)) for _ in self.chunks],
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=num_microbatches,
            seq_length=self.seq_length(),
            micro_batch_size=self.micro_batch_size,
            forward_only=forward_only,
        )

    def _forward(self, iteration: int, context, data_iterator, model):
        """Megatron's forward_step_func contract: (output, loss function) for the next micro-batch."""
        mb = next(data_iterator)
        chunk = unwrapped(model)
        ctx = getattr(chunk, "elastic_context", None) or context
        if ctx is not None:
            ctx.set(iteration, mb, self.reader.sample_offset(mb))
        first, last = chunk.pre_process, chunk.post_process
        # A middle stage reads the batch only for the padding its MoE layers route around.
        needed = first or last or "padding_mask" in self._data_sample()
        batch = policy().to_device(self.reader.get(iteration, mb)) if needed else None
        output = model(
            batch["tokens"] if first else None,
            batch["position_ids"] if first else None,
            None,
            labels=batch["labels"] if last else None,
            padding_mask=self._padding_mask(batch, chunk, first),
        )
        return output, batch

    @staticmethod
    def _padding_mask(batch: Optional[dict], chunk, first: bool) -> Optional[torch.Tensor]:
        """Chat data's padding ([b, s], True = pad) for Megatron's MoE routing, which leaves
        pads out of the aux losses, z-loss and expert-bias counts (the router's hierarchical loss
        too). Every stage's MoE layers need it; Megatron splits it for sequence parallelism on
        the first stage only, so later stages get their tensor-parallel rank's chunk here."""
        pad = batch.get("padding_mask") if batch is not None else None
        if pad is None or first or not chunk.config.sequence_parallel:
            return pad
        from megatron.core import parallel_state as ps

        return tensor_parallel_sequence_chunk(pad, pad.shape[1] // ps.get_tensor_model_parallel_world_size())

    # ------------------------------------------------------------------ training
    def train(self, iteration: int, before_finalize: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """Forward and backward over the iteration's micro-batches, then the gradient reduction.

        Returns the sum over micro-batches of the per-micro-batch mean loss (float64, on the
        device, not synced): the real sum on the last pipeline stage, 0 on the others.
        """
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.utils import get_model_config

        loss_sum = torch.zeros((), dtype=torch.float64, device=policy().device)

        def loss_func(loss_mask, per_token):
            loss = masked_mean_loss(per_token, loss_mask)
            # The schedule scales ``loss`` in place afterwards: add a copy.
            loss_sum.add_(loss.detach().double())
            return loss, {}

        def forward_step(data_iterator, model):
            output, batch = self._forward(iteration, None, data_iterator, model)
            return output, partial(loss_func, batch["loss_mask"] if batch is not None else None)

        def finalize(chunks, num_tokens, **kwargs):
            before_finalize(loss_sum)
            finalize_model_grads(chunks, num_tokens, **kwargs)

        config = get_model_config(self.chunks[0])
        config.finalize_model_grads_func = finalize
        self._run(forward_step, forward_only=False, num_microbatches=self.reader.num_microbatches)
        return loss_sum

    # ------------------------------------------------------------------ evaluation
    def evaluation_sums(self, iterations: int, context=None, iteration_base: int = 0,
                        on_forward: Optional[ForwardHook] = None) -> torch.Tensor:
        """``[sum of masked per-token losses, number of masked tokens]`` (float64, CPU) over
        ``iterations`` batches, forward only; non-zero on the last pipeline stage only. Batch
        ``it`` is scored under step coordinates (iteration_base + it, mb)."""
        sums = torch.zeros(2, dtype=torch.float64)

        def loss_func(batch, per_token):
            mask = batch["loss_mask"].to(per_token.device).float()
            sums[0] += float((per_token.float() * mask).sum())
            sums[1] += float(mask.sum())
            if on_forward is not None:
                on_forward(per_token, batch)
            return per_token.new_zeros(()), {}

        for it in range(iterations):
            iteration = iteration_base + it

            def forward_step(data_iterator, model, iteration=iteration):
                output, batch = self._forward(iteration, context, data_iterator, model)
                return output, partial(loss_func, batch)

            self._run(forward_step, forward_only=True, num_microbatches=self.reader.num_microbatches)
        return sums
