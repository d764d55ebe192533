"""Model FLOPs from the realised per-layer k, checked against a hand count."""

from __future__ import annotations

import pytest

from megatron_elastic.config import Config
from megatron_elastic.training.flops import flops_metrics, training_flops_per_token


def _cfg(**train):
    raw = {"model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
                     "seq_length": 32, "num_moe_experts": 4, "moe_ffn_hidden_size": 32},
           "elastic": {"schedule": "layerwise", "k_min": 1, "k_max": 4},
           "train": train}
    return Config.from_dict(raw).validate()


# Per layer: QKV 2*64*(64+2*32) = 16384, output 2*64*64 = 8192, QK^T + AV 4*32*64 = 8192,
# router 2*64*4 = 512 -> 33280; each expert 2*64*64 + 2*32*64 = 12288; logits 2*64*512 = 65536.
@pytest.mark.parametrize("ks, forward", [
    ((1, 1), 2 * 33280 + 12288 * 2 + 65536),   # 156672
    ((4, 2), 2 * 33280 + 12288 * 6 + 65536),   # 205824
    ((1.5, 2.5), 2 * 33280 + 12288 * 4 + 65536),  # mean k of a layer-wise / top-p step
])
def test_training_flops_match_hand_count(ks, forward):
    assert training_flops_per_token(_cfg(), ks, vocab_size=512) == 3 * forward


def test_tflops_and_mfu_from_realised_k():
    cfg = _cfg(peak_tflops=100.0)
    out = flops_metrics(cfg, {"k": [1.0, 1.0]}, tokens_per_s=1e6, vocab_size=512, world_size=2)
    assert out["tflops_per_device"] == pytest.approx(1e6 * 3 * 156672 / 2 / 1e12)
    assert out["mfu"] == pytest.approx(out["tflops_per_device"] / 100.0)
    # Without a known peak (CPU, no override) only TFLOP/s is reported.
    assert "mfu" not in flops_metrics(_cfg(), {"k": [4.0, 2.0]}, 1e6, vocab_size=512, world_size=1)


def test_k_list_must_cover_every_layer():
    with pytest.raises(ValueError, match="k_per_layer has 1 entries for 2 MoE layers"):
        training_flops_per_token(_cfg(), [2], vocab_size=512)


def test_shared_expert_and_dense_layers_are_counted():
    """A dense layer costs attention + 6 h F and has no k; a shared expert adds 6 h s + 2 h (gate)
    to every MoE layer whatever k; the tracker's per-global-layer k list is narrowed to MoE layers."""
    raw = {"model": {"num_layers": 3, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
                     "seq_length": 32, "num_moe_experts": 4, "moe_ffn_hidden_size": 32, "ffn_hidden_size": 96,
                     "moe_layer_freq": [1, 0, 1], "moe_shared_expert_intermediate_size": 16,
                     "moe_shared_expert_gate": True},
           "elastic": {"schedule": "layerwise", "k_min": 1, "k_max": 4}, "train": {"peak_tflops": 1.0}}
    cfg = Config.from_dict(raw).validate()
    attention, router, expert = 16384 + 8192 + 8192, 512, 12288
    shared = 6 * 64 * 16 + 2 * 64
    dense = attention + 6 * 64 * 96
    forward = 2 * (attention + router + shared) + expert * (1 + 3) + dense + 65536
    assert training_flops_per_token(cfg, [1, 3], vocab_size=512) == 3 * forward
    with pytest.raises(ValueError, match="3 entries for 2 MoE layers"):
        training_flops_per_token(cfg, [1, 1, 3], vocab_size=512)
    out = flops_metrics(cfg, {"k": [1.0, 0.0, 3.0]}, tokens_per_s=1e6, vocab_size=512, world_size=1)
    assert out["tflops_per_device"] == pytest.approx(1e6 * 3 * forward / 1e12)
