"""Elastic k on transformers models (convert/hf_elastic.py)."""

from __future__ import annotations

import pytest
import torch

from conversion_helpers import hf_mixtral, sample_tokens


def test_hf_inference_k_helper():
    from megatron_elastic.convert.hf_elastic import get_hf_inference_k, inference_k_from_config, set_hf_inference_k

    model = hf_mixtral()
    assert get_hf_inference_k(model) == [2, 2]
    assert set_hf_inference_k(model, [1, 4]) == [1, 4]
    assert [layer.mlp.gate.top_k for layer in model.model.layers] == [1, 4]
    assert inference_k_from_config(model.config) == [1, 4]  # kept by save_pretrained
    with torch.no_grad():
        k14 = model(input_ids=sample_tokens()).logits
    set_hf_inference_k(model, 3)
    assert get_hf_inference_k(model) == [3, 3] and model.config.num_experts_per_tok == 3
    with torch.no_grad():
        assert (model(input_ids=sample_tokens()).logits - k14).abs().max() > 1e-3
    with pytest.raises(ValueError, match="2 MoE layers"):
        set_hf_inference_k(model, [1, 2, 3])
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        set_hf_inference_k(model, 5)
