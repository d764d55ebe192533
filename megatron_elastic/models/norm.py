"""Torch norms for the layer specs: one that supports sequence parallelism (local, non-Transformer-
Engine spec) and a QK-norm over the whole q / k projection (``ProjectionRMSNorm``, below).

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


class ProjectionRMSNorm(torch.nn.RMSNorm):
    """QK-norm over a whole q or k projection (OLMoE) instead of over each head (Megatron-core).

    Megatron's ``SelfAttention`` builds ``q_layernorm`` / ``k_layernorm`` with the head dimension
    and applies them to ``[s, b, heads, head_dim]``; this module takes that call as it is, but its
    weight spans ``heads x head_dim`` (``heads`` = ``query``: the attention heads, ``key``: the
    query groups) and it normalises each token's flattened projection, as OLMoE's ``q_norm`` /
    ``k_norm`` do. Under tensor parallelism each rank holds a slice of the heads and the mean
    square would need a cross-rank sum; validation refuses that layout instead.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 heads: str = "query", **_unused):
        if config.normalization != "RMSNorm":
            raise ValueError(f"projection QK-norm is an RMSNorm; normalization={config.normalization!r}")
        if config.tensor_model_parallel_size != 1:
            raise ValueError("projection QK-norm needs tensor_model_parallel_size=1")
        count = {"query": config.num_attention_heads, "key": config.num_query_groups}[heads]
        super().__init__(count * hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
        return super().forward(flat).reshape(x.shape)
