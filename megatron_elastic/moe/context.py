"""Where the training loop tells the elastic routers which step they are in.

Routers need the iteration and micro-batch to draw this step's k (M-MoE) and the global index of
each token to draw its candidate-pool sample (EMoE). Passing these through Megatron-core's
``GPTModel.forward`` would mean forking it; one small shared object set by the loop before each
forward keeps Megatron's signatures intact.

M-MoE's micro-batch and layer-wise k draws are keyed by the *global* micro-batch: the b samples
``[g*b, (g+1)*b)`` of the iteration's global batch, ``g = sample_offset // b``. A sample therefore
gets the same k under any data-parallel size (DP = 1 with 4 micro-batches and DP = 2 with 2 draw
the same four k's for the same samples), which is what lets a checkpoint resume under another
layout on the same trajectory. Ranks of one expert-parallel group hold different samples and may
route one layer with different k at once; the dropless all-to-all exchanges per-expert counts, so
nothing else needs to agree (padded-to-capacity buffers would: see config validation).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepContext:
    iteration: int = 0
    microbatch: int = 0
    # Global index (within the iteration's global batch) of the first sample this rank's
    # micro-batch holds: sample b of the micro-batch is sample_offset + b globally. Keys the
    # per-token pool draws so they do not depend on how samples are spread over ranks.
    sample_offset: int = 0

    def set(self, iteration: int, microbatch: int, sample_offset: int) -> None:
        self.iteration = int(iteration)
        self.microbatch = int(microbatch)
        self.sample_offset = int(sample_offset)

    def global_microbatch(self, micro_batch_size: int) -> int:
        """Index of this rank's micro-batch among the global batch's micro-batches."""
        return self.sample_offset // max(1, int(micro_batch_size))
