"""Model FLOPs from the k each layer actually used, and MFU where the device's peak is known.

Counted per token, forward pass, as multiply-adds x 2, for the model this package builds (SwiGLU
experts, grouped-query attention, untied output layer; MoE layers where ``model.moe_layer_pattern``
has a 1, dense SwiGLU layers elsewhere):

* attention projections: 2 h (q + 2 kv) for QKV and 2 q h for the output, where q = heads x
  kv_channels and kv = query_groups x kv_channels;
* attention core: 2 s q for QK^T and 2 s q for AV (full s; no discount for the causal mask,
  as Megatron-LM's own count);
* router: 2 h E;
* experts: k_l x (2 h 2f + 2 f h) = 6 h f k_l, with k_l the mean k that MoE layer used this step
  (so a layer-wise or top-p schedule is charged what it ran, not k_max);
* shared expert (always on, not counted in k): 6 h s, plus 2 h for its sigmoid gate;
* dense layer (no router, no k): 6 h F with F = ffn_hidden_size;
* output layer: 2 h V.

Training = 3 x forward (the backward pass costs twice the forward). MFU divides the achieved
model FLOP/s per device by the device's dense bf16 peak: the table below, or
``train.peak_tflops`` for other hardware. On CPU only TFLOP/s is reported.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from megatron_elastic.config import Config
from megatron_elastic.device import policy

# Dense bf16 peak, TFLOP/s per device (vendor datasheets, SXM parts, no sparsity).
PEAK_BF16_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "B200": 2250.0,
}


def forward_flops_per_token(cfg: Config, k_per_layer: Sequence[float], vocab_size: int) -> float:
    """``k_per_layer``: the mean k of each MoE layer, in depth order (dense layers have none)."""
    m = cfg.model
    h = m.hidden_size
    kv_channels = m.kv_channels or h // m.num_attention_heads
    q = m.num_attention_heads * kv_channels
    kv = m.num_query_groups * kv_channels
    s = m.seq_length
    num_moe = len(m.moe_layers)
    if len(k_per_layer) != num_moe:
        raise ValueError(f"k_per_layer has {len(k_per_layer)} entries for {num_moe} MoE layers "
                         "(one per MoE layer, in depth order)")
    attention = 2 * h * (q + 2 * kv) + 2 * q * h + 4 * s * q
    router = 2 * h * m.num_moe_experts
    per_expert = 6 * h * m.moe_ffn_hidden_size
    shared = 0
    if m.moe_shared_expert_intermediate_size:
        shared = 6 * h * m.moe_shared_expert_intermediate_size + (2 * h if m.moe_shared_expert_gate else 0)
    dense = (m.num_layers - num_moe) * (attention + 6 * h * (m.ffn_hidden_size or 0))
    layers = sum(attention + router + shared + per_expert * k for k in k_per_layer) + dense
    return float(layers + 2 * h * vocab_size)


def training_flops_per_token(cfg: Config, k_per_layer: Sequence[float], vocab_size: int) -> float:
    return 3.0 * forward_flops_per_token(cfg, k_per_layer, vocab_size)


def peak_tflops(cfg: Config) -> Optional[float]:
    """The device's dense bf16 peak: ``train.peak_tflops`` if set, else the table (GPU only)."""
    if cfg.train.peak_tflops is not None:
        return cfg.train.peak_tflops
    if not policy().cuda:
        return None
    name = policy().device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def flops_metrics(cfg: Config, moe_metrics: Dict[str, List[float]], tokens_per_s: float,
                  vocab_size: Optional[int] = None, world_size: Optional[int] = None) -> Dict[str, float]:
    """TFLOP/s per device (and MFU where the peak is known) for the log line."""
    import torch.distributed as dist

    # Megatron's tracker holds one entry per global layer (0 for dense layers): keep the MoE ones.
    moe_layers = cfg.model.moe_layers
    ks = moe_metrics.get("k")
    if ks and len(ks) == cfg.model.num_layers:
        ks = [ks[i] for i in moe_layers]
    else:
        ks = [float(cfg.elastic_k_max)] * len(moe_layers)
    vocab = vocab_size or cfg.model.vocab_size or 0
    world = world_size or (dist.get_world_size() if dist.is_initialized() else 1)
    tflops = tokens_per_s * training_flops_per_token(cfg, ks, vocab) / world / 1e12
    out = {"tflops_per_device": tflops}
    peak = peak_tflops(cfg)
    if peak:
        out["mfu"] = tflops / peak
    return out
