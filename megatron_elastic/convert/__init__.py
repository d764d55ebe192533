"""Hugging Face conversion: Megatron-core distributed checkpoints <-> Mixtral / Qwen3-MoE /
Qwen2-MoE / OLMoE / DeepSeek-V2/V3 (multi-latent attention: ``deepseek_v3`` maps both, ``deepseek_v3_io``
converts them).

* ``to_hf.convert_megatron_to_hf``: a checkpoint saved under any tensor/expert-parallel layout
  -> a ``transformers`` model directory (``MixtralForCausalLM``, ``Qwen3MoeForCausalLM`` for
  per-head QK-norm, ``Qwen2MoeForCausalLM`` for a gated shared expert, ``OlmoeForCausalLM`` for
  projection-wide QK-norm; mixed dense/MoE layers as Qwen2/3-MoE ``mlp_only_layers``), streamed
  one layer at a time.
* ``from_hf.convert_hf_to_megatron``: the inverse, plus a YAML recipe to continue training.
* ``hf_elastic``: set the number of activated experts k' on a loaded transformers model,
  globally or per layer, and read the per-layer k the export recorded.
* ``hf_tokenizer``: the project's lossless sentencepiece model as a ``tokenizer.json`` (a Hugging
  Face tokenizer directory is written back as it is).

The pieces both directions are built from: ``megatron_checkpoint`` (locate and verify a
checkpoint, recover its run config, read its tensors one layer at a time), ``hf_reader``
(safetensors weights of an HF directory), ``hf_writer`` (safetensors shards, index, atomic commit
of the output directory), ``hf_config`` (Megatron run config <-> config.json), ``mapping`` (tensor
names and layouts per architecture) and ``cli`` (what the two command lines share).

Imports are lazy so ``import megatron_elastic.convert`` stays cheap (the CLIs parse arguments
before paying for torch/transformers).
"""

from __future__ import annotations


class ConversionError(ValueError):
    """A conversion that cannot proceed; the message names what is wrong and how to fix it."""


class UnknownArchitectureError(ConversionError):
    """The source or requested architecture is not one this converter maps."""


class MissingTensorError(ConversionError):
    """A tensor the architecture needs is absent from the source."""


class ShapeMismatchError(ConversionError):
    """A tensor exists but its shape disagrees with the configuration."""


class IncompleteCheckpointError(ConversionError):
    """The checkpoint directory holds no complete save (interrupted or partial)."""


class TargetExistsError(ConversionError):
    """The output directory already exists and ``overwrite`` was not requested."""


__all__ = [
    "ConversionError",
    "UnknownArchitectureError",
    "MissingTensorError",
    "ShapeMismatchError",
    "IncompleteCheckpointError",
    "TargetExistsError",
    "convert_megatron_to_hf",
    "convert_hf_to_megatron",
    "set_hf_inference_k",
    "get_hf_inference_k",
    "load_elastic_hf",
]


def __getattr__(name):
    if name == "convert_megatron_to_hf":
        from megatron_elastic.convert.to_hf import convert_megatron_to_hf

        return convert_megatron_to_hf
    if name == "convert_hf_to_megatron":
        from megatron_elastic.convert.from_hf import convert_hf_to_megatron

        return convert_hf_to_megatron
    if name in ("set_hf_inference_k", "get_hf_inference_k", "load_elastic_hf"):
        from megatron_elastic.convert import hf_elastic

        return getattr(hf_elastic, name)
    raise AttributeError(f"module 'megatron_elastic.convert' has no attribute {name!r}")
