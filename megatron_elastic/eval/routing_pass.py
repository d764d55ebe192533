"""One evaluation pass that keeps what every router saw: the loss and, per MoE layer, the
routing maps and the full routing distributions of every evaluated token (CPU copies; the
distributions as float16 while collecting). Used by the budget search and the study's router
diagnostics; the loss is the trainer's own (``training/evaluation.evaluation_loss_sums``)."""

from __future__ import annotations

from typing import List

import torch


class Pass:
    """Loss and, per MoE layer, the routing maps and routing distributions of one evaluation."""

    def __init__(self, loss: float, tokens: int, maps: List[torch.Tensor], scores: List[torch.Tensor]):
        self.loss, self.tokens, self.maps, self.scores = loss, tokens, maps, scores


def collect(model, reader, eval_iters: int, keep: bool = True) -> Pass:
    from megatron_elastic.moe.router import elastic_routers
    from megatron_elastic.training.evaluation import evaluation_loss_sums

    routers = elastic_routers(model)
    maps: List[List[torch.Tensor]] = [[] for _ in routers]
    scores: List[List[torch.Tensor]] = [[] for _ in routers]
    for r in routers:
        r.record_routing = keep

    def record(per_token, batch) -> None:
        for i, r in enumerate(routers):
            maps[i].append(r.last_routing_map.cpu())
            scores[i].append(r.last_scores.to(torch.float16).cpu())
            r.last_routing_map = r.last_scores = None

    try:
        sums = evaluation_loss_sums(model, reader, eval_iters, model.elastic_context,
                                    on_forward=record if keep else None)
    finally:
        for r in routers:
            r.record_routing = False
    loss = float(sums[0] / sums[1].clamp(min=1.0))
    if not keep:
        return Pass(loss, int(sums[1]), [], [])
    return Pass(loss, int(sums[1]), [torch.cat(m) for m in maps], [torch.cat(s).float() for s in scores])
