"""Inference control: how many experts each layer activates at evaluation time.

``set_inference_k(model, 4)`` sets k'=4 everywhere; ``set_inference_k(model, [6, 4, 2, 1])`` sets
a per-layer budget (one entry per MoE layer of the whole model, in depth order: a pipeline stage
reads the entries of its own layers); ``set_inference_k(model,
top_p=0.5)`` lets each token take the smallest k whose probability mass reaches 0.5 (within
``top_p_k_range``, default [1, num_experts], so a fixed-k model can go above its training k);
``set_inference_k(model, None)`` restores the default (the training k,
or k_max for a varying schedule). Training forwards are unaffected: they follow the schedule.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from megatron_elastic.moe.router import elastic_routers

KSpec = Union[None, int, Sequence[int]]


def set_inference_k(model: torch.nn.Module, k: KSpec = None, top_p: Optional[float] = None,
                    top_p_k_range: Optional[tuple] = None) -> None:
    routers = elastic_routers(model)
    if not routers:
        raise ValueError("model has no elastic routers; was it built by megatron_elastic?")
    if top_p is not None:
        if k is not None:
            raise ValueError("pass k or top_p, not both")
        for router in routers:
            router.set_inference(top_p=top_p, top_p_k_range=top_p_k_range)
        return
    if k is None or isinstance(k, int):
        for router in routers:
            router.set_inference(k=k)
        return
    ks = list(k)
    total = routers[0].num_moe_layers or len(routers)
    if len(ks) != total:
        raise ValueError(f"per-layer k lists {len(ks)} values but the model has {total} MoE layers")
    for i, router in enumerate(routers):
        index = router.moe_index if router.moe_index is not None else i
        router.set_inference(k=int(ks[index]))


def inference_k(model: torch.nn.Module) -> List[Optional[int]]:
    """The k' each layer uses at evaluation (None where a top-p threshold decides per token)."""
    out = []
    for router in elastic_routers(model):
        if router.eval_top_p is not None:
            out.append(None)
        else:
            out.append(router.eval_k if router.eval_k is not None else router.default_eval_k)
    return out
