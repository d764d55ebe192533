"""Architecture choice and refusals of the export (convert/hf_config.py)."""

from __future__ import annotations

import pytest


def test_export_architecture_choice_and_refusals():
    from megatron_elastic.config import Config
    from megatron_elastic.convert import ConversionError, UnknownArchitectureError
    from megatron_elastic.convert.hf_config import choose_architecture

    def cfg(**model):
        return Config.from_dict({"model": model}).validate()

    assert choose_architecture(cfg()) == "mixtral"
    assert choose_architecture(cfg(qk_layernorm=True)) == "qwen3_moe"
    assert choose_architecture(cfg(qk_layernorm=True, moe_router_pre_softmax=True)) == "qwen3_moe"
    with pytest.raises(UnknownArchitectureError, match="gpt2"):
        choose_architecture(cfg(), "gpt2")
    # Mixtral always renormalises: a pre-softmax router would silently change the model.
    with pytest.raises(ConversionError, match="renormalises"):
        choose_architecture(cfg(moe_router_pre_softmax=True))
    with pytest.raises(ConversionError, match="qwen3_moe"):
        choose_architecture(cfg(qk_layernorm=True), "mixtral")
    with pytest.raises(ConversionError, match="sigmoid"):
        choose_architecture(cfg(moe_router_score_function="sigmoid"))
