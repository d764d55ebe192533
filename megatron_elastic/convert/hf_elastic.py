"""Elastic k for transformers Mixtral / Qwen3-MoE / Qwen2-MoE / OLMoE models: choose k' after
loading.

In transformers (5.x) each MoE layer's router (``MixtralTopKRouter``, ``Qwen3MoeTopKRouter``,
``Qwen2MoeTopKRouter``, ``OlmoeTopKRouter``: the ``gate`` of the sparse block) reads
``self.top_k`` at every forward; the experts module takes whatever ``[tokens, k]`` selection it is
handed. Setting ``top_k`` per router therefore changes k' per layer with no patching. Dense
layers (Qwen2/3-MoE ``mlp_only_layers``) have no router and no k; Qwen2-MoE's shared expert is
always on and is not counted in k'. What k' means follows the exported router semantics:

* Mixtral, and the others with ``norm_topk_prob=true``: the k' selected probabilities are
  renormalised to sum to 1 (Megatron ``moe_router_pre_softmax=false``);
* Qwen3-MoE / Qwen2-MoE / OLMoE with ``norm_topk_prob=false``: the raw softmax probabilities are
  used, so the total gate weight grows with k' (Megatron ``moe_router_pre_softmax=true``).

``load_elastic_hf`` applies the per-layer k an export recorded (``config.elastic_moe.inference_k``)
on top of ``from_pretrained``; plain ``AutoModelForCausalLM.from_pretrained`` uses
``num_experts_per_tok`` everywhere.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

KSpec = Union[None, int, Sequence[int]]


def _decoder_layers(model: torch.nn.Module):
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__} has no decoder layers (model.model.layers); expected a "
            "Mixtral / Qwen3-MoE / Qwen2-MoE / OLMoE causal LM or its base model"
        )
    return layers


def _is_router(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(getattr(module, "top_k", None), int)
        and isinstance(getattr(module, "num_experts", None), int)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[0] == module.num_experts
    )


def moe_routers(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The router of every MoE layer, in depth order (dense layers, if any, are skipped)."""
    routers = []
    for layer in _decoder_layers(model):
        found = [m for m in layer.modules() if _is_router(m)]
        if len(found) > 1:
            raise ValueError(f"{type(layer).__name__} has {len(found)} routers; expected one per MoE layer")
        routers.extend(found)
    if not routers:
        raise ValueError(
            f"{type(model).__name__} has no MoE routers with a top_k attribute; is it a Mixtral, "
            "Qwen3-MoE, Qwen2-MoE or OLMoE model loaded with transformers >= 5?"
        )
    return routers


def _sparse_blocks(model: torch.nn.Module) -> List[List[torch.nn.Module]]:
    """Per MoE layer (same order as ``moe_routers``), the modules other than its router that also
    carry ``top_k`` (Mixtral's sparse block keeps a copy); kept in sync so inspection shows the k
    actually used."""
    out = []
    for layer in _decoder_layers(model):
        if any(_is_router(m) for m in layer.modules()):
            out.append([m for m in layer.modules()
                        if isinstance(getattr(m, "top_k", None), int) and not _is_router(m)])
    return out


def get_hf_inference_k(model: torch.nn.Module) -> List[int]:
    return [r.top_k for r in moe_routers(model)]


def set_hf_inference_k(model: torch.nn.Module, k: KSpec = None) -> List[int]:
    """Set k' for every MoE layer (an int), per layer (a list, one entry per MoE layer in depth
    order), or restore the exported default (None: ``elastic_moe.inference_k`` if recorded, else
    ``num_experts_per_tok``). Returns the per-layer k now in effect.

    The choice is mirrored into ``model.config`` (``num_experts_per_tok`` for an int,
    ``elastic_moe.inference_k`` for a list) so ``save_pretrained`` keeps it.
    """
    routers = moe_routers(model)
    config = getattr(model, "config", None)
    if k is None:
        ks = inference_k_from_config(config, len(routers)) if config is not None else None
        if ks is None:
            ks = [int(getattr(config, "num_experts_per_tok", routers[0].top_k))] * len(routers)
    elif isinstance(k, int) and not isinstance(k, bool):
        ks = [k] * len(routers)
    else:
        ks = [int(v) for v in k]
        if len(ks) != len(routers):
            raise ValueError(f"per-layer k lists {len(ks)} values but the model has {len(routers)} MoE layers "
                             "(one k per MoE layer in depth order; dense layers have none)")
    for layer, (router, k_l) in enumerate(zip(routers, ks)):
        if not 1 <= k_l <= router.num_experts:
            raise ValueError(f"k'={k_l} for MoE layer {layer} must lie in [1, {router.num_experts}]")
    for router, k_l in zip(routers, ks):
        router.top_k = k_l
    for blocks, k_l in zip(_sparse_blocks(model), ks):
        for block in blocks:
            block.top_k = k_l
    if config is not None and k is not None:
        meta = dict(getattr(config, "elastic_moe", None) or {})
        if isinstance(k, int):
            config.num_experts_per_tok = k
            meta["inference_k"] = None
        else:
            meta["inference_k"] = ks
        config.elastic_moe = meta
    return ks


def inference_k_from_config(config, num_moe_layers: Optional[int] = None) -> Optional[List[int]]:
    """The per-layer k recorded under ``elastic_moe.inference_k`` (None when absent)."""
    meta = getattr(config, "elastic_moe", None)
    if isinstance(config, dict):
        meta = config.get("elastic_moe")
    if not meta or not meta.get("inference_k"):
        return None
    ks = [int(v) for v in meta["inference_k"]]
    if num_moe_layers is not None and len(ks) != num_moe_layers:
        raise ValueError(
            f"config elastic_moe.inference_k lists {len(ks)} values for {num_moe_layers} MoE layers"
        )
    return ks


def load_elastic_hf(path, k: KSpec = None, **from_pretrained_kwargs):
    """``AutoModelForCausalLM.from_pretrained(path)`` with the exported per-layer k applied.

    ``k`` overrides it (an int or a per-layer list). Returns the model in eval mode.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    set_hf_inference_k(model, k)
    model.eval()
    return model
