"""Which global layers a pipeline stage (and virtual chunk) builds, and under which names its
weights are initialised: slices of the global per-layer spec list, global layer names."""

from __future__ import annotations

import pytest
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_elastic.config import Config
from megatron_elastic.models.gpt import (
    global_layer_name,
    moe_layer_numbers,
    stage_block_spec,
    transformer_config,
)


def _cfg(layers: int, pp: int, vp=None) -> Config:
    values = [f"model.num_layers={layers}", f"parallel.pipeline_model_parallel_size={pp}",
              f"parallel.virtual_pipeline_model_parallel_size={'null' if vp is None else vp}"]
    return Config().apply_overrides(values).validate()


def _stage_layers(monkeypatch, cfg, rank, vp_stage=None):
    """Global layer indices in the spec slice of pipeline rank ``rank`` (chunk ``vp_stage``),
    from a global list whose specs differ by layer (as for mixed dense/MoE models)."""
    monkeypatch.setattr(ps, "get_pipeline_model_parallel_rank", lambda: rank)
    markers = [f"layer{i}" for i in range(cfg.model.num_layers)]
    spec = TransformerBlockSubmodules(layer_specs=markers, layer_norm=None)
    sliced = stage_block_spec(cfg, transformer_config(cfg), spec, vp_stage)
    return [markers.index(m) for m in sliced.layer_specs]


def test_stages_take_consecutive_slices_of_the_global_list(monkeypatch):
    cfg = _cfg(4, 2)
    assert _stage_layers(monkeypatch, cfg, 0) == [0, 1]
    assert _stage_layers(monkeypatch, cfg, 1) == [2, 3]


def test_virtual_chunks_interleave_over_stages(monkeypatch):
    """PP 2 x VP 2 over 8 layers: chunk v of rank r holds layers (v * PP + r) * 2 + {0, 1}."""
    cfg = _cfg(8, 2, vp=2)
    assert _stage_layers(monkeypatch, cfg, 0, 0) == [0, 1]
    assert _stage_layers(monkeypatch, cfg, 1, 0) == [2, 3]
    assert _stage_layers(monkeypatch, cfg, 0, 1) == [4, 5]
    assert _stage_layers(monkeypatch, cfg, 1, 1) == [6, 7]


def test_a_spec_list_of_the_wrong_length_is_refused(monkeypatch):
    cfg = _cfg(4, 2)
    monkeypatch.setattr(ps, "get_pipeline_model_parallel_rank", lambda: 0)
    spec = TransformerBlockSubmodules(layer_specs=["a", "b"], layer_norm=None)
    with pytest.raises(ValueError, match="block spec lists 2 layers for model.num_layers=4"):
        stage_block_spec(cfg, transformer_config(cfg), spec, None)


def test_global_layer_names_and_moe_layer_numbers():
    assert global_layer_name("decoder.layers.1.mlp.router.weight", 6) == "decoder.layers.7.mlp.router.weight"
    assert global_layer_name("decoder.layers.1.mlp.router.weight", 0) == "decoder.layers.1.mlp.router.weight"
    assert global_layer_name("output_layer.weight", 6) == "output_layer.weight"
    assert global_layer_name("decoder.final_layernorm.weight", 6) == "decoder.final_layernorm.weight"
    assert moe_layer_numbers(_cfg(4, 1), use_te=False) == [1, 2, 3, 4]  # every layer is MoE here
