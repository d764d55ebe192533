"""A torch norm that supports sequence parallelism, for the local (non-Transformer-Engine) spec.

Megatron-core's ``WrappedTorchNorm`` refuses ``sequence_parallel`` because, under sequence
parallelism, each tensor-parallel rank normalises a different slice of the sequence, so the norm
weight's gradient on one rank covers only that slice. Megatron's fused norms (``FusedLayerNorm``,
TE's) handle this by tagging their parameters ``sequence_parallel = True``; ``finalize_model_grads``
then all-reduces the gradients of tagged parameters over the tensor-parallel group. This norm does
the same with ``torch.nn.RMSNorm`` / ``torch.nn.LayerNorm``, so a CPU (or TE-less GPU) run can use
TP > 1 with sequence parallelism, which Megatron requires for MoE layers under TP.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class SequenceParallelTorchNorm:
    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centred gamma is not supported by the torch norm")
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization={config.normalization!r}: use LayerNorm or RMSNorm")
        for param in norm.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)
        return norm
