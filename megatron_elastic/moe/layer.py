"""MoE layer that wires the elastic router to the elastic dispatcher.

``ElasticMoELayer`` is Megatron-core's ``MoELayer`` (selected through the layer spec) with one
change of parts: the all-to-all dispatcher becomes ``ElasticAlltoAllTokenDispatcher``, and after
routing the layer tells it which k the router used so buffers are sized to k_l.
``attach_elastic`` configures every router of a built model from the run config.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_elastic.config import ElasticConfig
from megatron_elastic.moe.context import StepContext
from megatron_elastic.moe.dispatcher import ElasticAlltoAllTokenDispatcher
from megatron_elastic.moe.router import ElasticRouter, elastic_routers
from megatron_elastic.moe.schedules import KSampler


class _SubclassNoticeFilter(logging.Filter):
    """Megatron-core 0.16.1's TransformerLayer recognises MLP modules by identity
    (``spec.module in (MoELayer, ...)``), so for this subclass it logs "Unknown MLP type ...
    Using default kwargs" at every layer and builds it without ``pg_collection``;
    ``ElasticMoELayer`` then takes the default process groups, which are the groups every model
    here is built with. That notice says nothing to a user and is dropped; other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_SubclassNoticeFilter())


class ElasticMoELayer(MoELayer):
    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        super().__init__(
            config=config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection
        )
        if config.moe_token_dispatcher_type == "alltoall":
            self.token_dispatcher = ElasticAlltoAllTokenDispatcher(
                self.num_local_experts,
                self.local_expert_indices,
                config=self.config,
                pg_collection=pg_collection if pg_collection is not None else self._pg_collection(),
            )

    def _pg_collection(self):
        from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

        return get_default_pg_collection()

    def route(self, hidden_states: torch.Tensor, padding_mask=None):
        probs, routing_map = super().route(hidden_states, padding_mask)
        # k flows one way: the router decided it; the dispatcher sizes this forward's buffers by it.
        if isinstance(self.router, ElasticRouter) and isinstance(
            self.token_dispatcher, ElasticAlltoAllTokenDispatcher
        ):
            self.token_dispatcher.set_step_k(self.router.last_k)
        return probs, routing_map


def attach_elastic(model: torch.nn.Module, e: ElasticConfig,
                   moe_layer_numbers: Optional[Sequence[int]] = None) -> StepContext:
    """Give every elastic router its k sampler, pool, losses and the shared step context, from
    the (validated, hence resolved) ``elastic`` section of the run config.

    ``moe_layer_numbers``: the global (1-based) numbers of all the model's MoE layers, which a
    pipeline stage holds only some of; each router learns its position among them, which is
    where a per-layer inference k list is read (``control.set_inference_k``). Default: the
    routers present, in depth order (a whole model)."""
    if e.k_min is None or e.k_max is None or e.seed is None:
        raise ValueError("attach_elastic needs a validated config (Config.validate() resolves k and seed)")
    context = StepContext()
    k_min, k_max = e.k_range
    sampler = KSampler(
        schedule=e.schedule,
        k_min=k_min,
        k_max=k_max,
        distribution=e.distribution,
        tau=e.tau,
        top_p=e.top_p,
        seed=e.seed,
        fixed_k=e.k_train if e.schedule == "fixed" else None,
    )
    routers = elastic_routers(model)
    numbers = list(moe_layer_numbers) if moe_layer_numbers is not None else [r.layer_number for r in routers]
    for router in routers:
        if router.layer_number not in numbers:
            raise ValueError(f"MoE layer {router.layer_number} is not among the model's MoE layers {numbers}")
        router.moe_index = numbers.index(router.layer_number)
        router.num_moe_layers = len(numbers)
        router.configure(
            sampler=sampler,
            context=context,
            pool_ratio=e.pool_ratio,
            router_loss_coeff=e.router_loss_coeff,
            seed=e.seed,
            top_p=e.top_p,
            default_eval_k=e.k_train,
        )
    model.elastic_context = context
    if e.eval_k is not None:
        from megatron_elastic.moe.control import set_inference_k

        set_inference_k(model, e.eval_k)
    return context
