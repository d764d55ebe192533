"""Where the training loop tells the elastic routers which step they are in.

Routers need the iteration and micro-batch to draw this step's k (M-MoE) and the global index of
each token to draw its candidate-pool sample (EMoE). Passing these through Megatron-core's
``GPTModel.forward`` would mean forking it; one small shared object set by the loop before each
forward keeps Megatron's signatures intact. Every rank sets the same iteration/micro-batch, so
every rank draws the same k for a layer without communicating.
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
