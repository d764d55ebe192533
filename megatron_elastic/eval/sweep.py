"""Elastic evaluation sweep: one model, every inference setting, loss and routing statistics.

``sweep`` measures the reference (the model's default inference k), optionally the training
routing, then every requested ``Setting``; each forward pass goes through the trainer's own
evaluation loop (``training/evaluation.evaluation_loss_sums``) with the routing maps recorded.
Per setting it returns the loss, perplexity, the measured k per layer, and the co-occurrence
distances to the reference and to the training routing (see ``eval/elastic_eval.py`` for what
they mean). The model's own inference k is restored afterwards.
"""

from __future__ import annotations

import math
import time
from typing import Callable, List, Optional, Sequence

import torch

from megatron_elastic.eval.settings import EvalError, Setting, check_settings, default_ks

SCHEMA_VERSION = 1


# ---------------------------------------------------------------------- measurement
class _Tally:
    """Loss and per-layer routing statistics accumulated over micro-batches."""

    def __init__(self, num_layers: int, num_experts: int):
        self.loss_sum = torch.zeros(2, dtype=torch.float64)  # [sum of token losses, tokens]
        self.cooc = torch.zeros(num_layers, num_experts, num_experts, dtype=torch.float64)
        self.routed = torch.zeros(num_layers, dtype=torch.float64)  # tokens seen by each router

    def add_routing(self, layer: int, routing_map: torch.Tensor) -> None:
        m = routing_map.to(torch.float32)
        # Sum form of routing_math.expert_cooccurrence (which divides by the tokens of one batch):
        # counts are summed here and divided once at the end, so every token weighs the same.
        self.cooc[layer] += (m.transpose(0, 1) @ m).double().cpu()
        self.routed[layer] += routing_map.shape[0]

    def all_reduce(self) -> None:
        """Sum over every rank. Replicated tokens (tensor-parallel ranks) scale the numerator and
        the denominator alike, so the shares stay exact in any layout."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        for t in (self.loss_sum, self.cooc, self.routed):
            dist.all_reduce(t)

    @property
    def loss(self) -> float:
        return float(self.loss_sum[0] / self.loss_sum[1].clamp(min=1.0))

    def matrices(self) -> torch.Tensor:
        return self.cooc / self.routed.clamp(min=1.0).view(-1, 1, 1)


def _eval_pass(model, reader, eval_iters: int, train_routing: bool = False) -> _Tally:
    """Forward ``eval_iters`` global batches of ``reader`` without gradients.

    ``train_routing=False``: evaluation mode, routers use the inference k' set on the model.
    ``train_routing=True``: training mode (dropout is what the config says), routers draw k and
    EMoE pools exactly as training would for those (iteration, micro-batch) coordinates.
    """
    from megatron_elastic.moe.router import elastic_routers

    from megatron_elastic.training.evaluation import evaluation_loss_sums

    routers = elastic_routers(model)
    num_experts = routers[0].num_experts
    tally = _Tally(len(routers), num_experts)
    context = _unwrap(model).elastic_context
    previous = [r.record_routing for r in routers]
    for r in routers:
        r.record_routing = True

    def record_routing(per_token, batch) -> None:
        for layer, router in enumerate(routers):
            if router.last_routing_map is None:
                raise RuntimeError(f"router of layer {router.layer_number} recorded no routing")
            tally.add_routing(layer, data_token_rows(router.last_routing_map, batch))
            router.last_routing_map = None

    try:
        # The trainer's own evaluation loop, with the routing of every forward recorded.
        tally.loss_sum = evaluation_loss_sums(model, reader, eval_iters, context,
                                              train_mode=train_routing, on_forward=record_routing)
    finally:
        for r, rec in zip(routers, previous):
            r.record_routing = rec
    tally.all_reduce()
    return tally


def data_token_rows(routing_map: torch.Tensor, batch: dict) -> torch.Tensor:
    """The rows of a router's ``[tokens, experts]`` map that hold data, not padding.

    Megatron routes ``[s, b]`` hidden states flattened sequence-major (row = s_idx * b + b_idx);
    under sequence parallelism a rank routes its tensor-parallel rank's chunk of s. Batches
    without a ``padding_mask`` ([b, s], True at padding: chat data) are all data."""
    pad = batch.get("padding_mask")
    if pad is None:
        return routing_map
    b, s = pad.shape
    s_local = routing_map.shape[0] // b
    if s_local != s:
        from megatron_elastic.training.schedule import tensor_parallel_sequence_chunk

        pad = tensor_parallel_sequence_chunk(pad, s_local)
    keep = ~pad.t().reshape(-1).to(routing_map.device)
    return routing_map[keep]


def _unwrap(model):
    """The GPT model under DDP / Float16Module wrappers (which hold it as ``.module``)."""
    while not hasattr(model, "elastic_context") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "elastic_context"):
        raise EvalError("model has no elastic_context; build it with megatron_elastic.models.gpt.build_model")
    return model


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def _frobenius(a: torch.Tensor, b: torch.Tensor) -> List[float]:
    return [float(torch.linalg.norm(a[i] - b[i])) for i in range(a.shape[0])]


def sweep(
    model,
    reader,
    cfg,
    ks: Optional[Sequence[int]] = None,
    budgets: Sequence[Sequence[int]] = (),
    top_ps: Sequence[float] = (),
    eval_iters: Optional[int] = None,
    train_reference: bool = True,
    keep_matrices: bool = False,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Evaluate ``model`` on ``reader`` at every setting; return the results dictionary.

    ``model`` is the unwrapped GPT built by ``megatron_elastic.models.gpt.build_model`` (its
    ``elastic_context`` and elastic routers are used); ``reader`` a ``BatchReader`` over the
    validation split. ``ks`` defaults to 1..2*k_max capped at the expert count. The model's own
    inference k is restored afterwards. See the docstring of ``eval/elastic_eval.py`` and
    ``docs/elastic_eval.md`` for the fields.
    """
    from megatron_elastic.moe.control import inference_k, set_inference_k
    from megatron_elastic.moe.router import elastic_routers

    routers = elastic_routers(model)
    if not routers:
        raise EvalError("model has no elastic routers; build it with megatron_elastic.models.gpt.build_model")
    num_layers, num_experts = len(routers), routers[0].num_experts
    ks = list(default_ks(cfg) if ks is None else ks)
    budgets = [list(b) for b in budgets]
    top_ps = list(top_ps)
    check_settings(ks, budgets, top_ps, num_layers, num_experts)
    eval_iters = cfg.train.eval_iters if eval_iters is None else eval_iters
    if eval_iters < 1:
        raise EvalError(f"eval_iters={eval_iters} must be >= 1")
    say = progress or (lambda msg: None)
    saved_eval = [(r.eval_k, r.eval_top_p) for r in routers]

    def measure(setting: Setting):
        setting.apply(model)
        t0 = time.time()
        tally = _eval_pass(model, reader, eval_iters, train_routing=setting.kind == "train")
        seconds = time.time() - t0
        mats = tally.matrices()
        slots = torch.stack([mats[i].diagonal().sum() for i in range(num_layers)])
        entry = {
            "name": setting.name,
            "kind": setting.kind,
            "k": setting.k,
            "budget": setting.budget,
            "top_p": setting.top_p,
            "k_per_layer": None if setting.kind in ("top_p", "train") else inference_k(model),
            "mean_k_per_layer": [round(float(v), 6) for v in slots],
            "mean_k": round(float(slots.mean()), 6),
            "loss": tally.loss,
            "ppl": _safe_exp(tally.loss),
            "tokens": int(tally.loss_sum[1]),
            "seconds": round(seconds, 3),
        }
        say(f"{setting.name:>16}: loss {entry['loss']:.4f} ppl {entry['ppl']:.2f} "
            f"mean k {entry['mean_k']:.2f} ({seconds:.1f}s)")
        return entry, mats

    try:
        t_start = time.time()
        set_inference_k(model, None)
        k_ref_layers = inference_k(model)
        ref_setting = Setting("k", k=k_ref_layers[0]) if len(set(k_ref_layers)) == 1 else Setting(
            "budget", budget=list(k_ref_layers))
        ref_entry, ref_mats = measure(ref_setting)
        train_entry, train_mats = None, None
        if train_reference:
            train_entry, train_mats = measure(Setting("train"))

        settings = [Setting("k", k=k) for k in ks]
        settings += [Setting("budget", budget=b) for b in budgets]
        settings += [Setting("top_p", top_p=p) for p in top_ps]
        entries = []
        for setting in settings:
            if setting.kind == ref_setting.kind and setting.k == ref_setting.k and setting.budget == ref_setting.budget:
                entry, mats = dict(ref_entry), ref_mats
            else:
                entry, mats = measure(setting)
            entries.append((entry, mats))

        def annotate(entry: dict, mats: torch.Tensor) -> dict:
            per_layer = _frobenius(mats, ref_mats)
            entry["delta_loss"] = entry["loss"] - ref_entry["loss"]
            entry["cooc_dist"] = sum(per_layer) / len(per_layer)
            entry["cooc_dist_per_layer"] = per_layer
            if train_mats is not None:
                per_layer_t = _frobenius(mats, train_mats)
                entry["cooc_dist_train"] = sum(per_layer_t) / len(per_layer_t)
                entry["cooc_dist_train_per_layer"] = per_layer_t
            entry["is_k_train"] = (entry["kind"] == ref_setting.kind and entry["k"] == ref_setting.k
                                   and entry["budget"] == ref_setting.budget)
            if keep_matrices:
                entry["cooccurrence"] = _rounded(mats)
            return entry

        results = [annotate(e, m) for e, m in entries]
        ref_out = annotate(dict(ref_entry), ref_mats)
        train_out = annotate(dict(train_entry), train_mats) if train_entry is not None else None
        if train_out is not None:
            train_out["is_k_train"] = False
        total = time.time() - t_start
    finally:
        for r, (k, p) in zip(routers, saved_eval):
            r.set_inference(k=k, top_p=p)

    e = cfg.elastic
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {
            "num_layers": cfg.model.num_layers,
            "num_moe_layers": num_layers,
            "num_moe_experts": num_experts,
            "moe_router_topk": cfg.model.moe_router_topk,
            "hidden_size": cfg.model.hidden_size,
            "seq_length": cfg.model.seq_length,
        },
        "elastic": {
            "schedule": e.schedule,
            "k_min": cfg.elastic_k_min,
            "k_max": cfg.elastic_k_max,
            "distribution": e.distribution,
            "pool_ratio": e.pool_ratio,
            "router_loss_coeff": e.router_loss_coeff,
            "top_p": e.top_p,
        },
        "k_train": ref_setting.k if ref_setting.kind == "k" else None,
        "k_train_per_layer": list(k_ref_layers),
        "eval": {
            "eval_iters": eval_iters,
            "global_batch_size": reader.gbs,
            "micro_batch_size": reader.mbs,
            "tokens": ref_entry["tokens"],
            "seconds": round(total, 3),
        },
        "ks": ks,
        "budgets": budgets,
        "top_ps": top_ps,
        "reference": ref_out,
        "train_routing": train_out,
        "results": results,
        "reference_cooccurrence": _rounded(ref_mats),
    }


def _rounded(mats: torch.Tensor, digits: int = 6) -> List[List[List[float]]]:
    return [[[round(float(v), digits) for v in row] for row in layer] for layer in mats]
