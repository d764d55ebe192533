"""Elastic evaluation: one checkpoint, many inference budgets.

An elastic MoE is trained so that the number of experts each token activates can be changed
after training. This module measures how well that works: for every inference setting

* a global k' (every MoE layer activates k' experts per token),
* a per-layer budget (``[6, 4, 2, 1]``: one k' per MoE layer, in depth order),
* a top-p threshold (each token takes the smallest k whose router mass reaches p, clipped to the
  trained [k_min, k_max]),

it reports the validation loss, the perplexity exp(loss), the k actually used per layer (measured
from the routing maps) and the EMoE co-occurrence diagnostic. For each MoE layer the expert
co-occurrence matrix is ``M[i, j]`` = share of tokens that activate both expert i and expert j
(``routing_math.expert_cooccurrence``, accumulated over all evaluated tokens). EMoE's
observation is that the distance between the co-activation pattern the model was trained with and
the one an inference k' induces predicts how much quality degrades at k', so every setting gets

* ``cooc_dist``: mean over layers of ``||M(setting) - M(k_train)||_F``, where ``M(k_train)`` is
  evaluation routing at the model's default inference k (the training k for ``fixed``, k_max for
  varying schedules); exactly 0 for the k_train setting itself;
* ``cooc_dist_train``: the same distance to ``M_train``, the co-occurrence of the *training*
  routing (the schedule's k draws and the EMoE candidate-pool sampling, run without gradients on
  the same validation tokens). For plain top-k training the two references coincide.

Entry points: :func:`sweep` (library), :func:`format_table`, :func:`write_json`,
:func:`plot`, and :func:`main` (the command line, also ``tools/elastic_eval.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from megatron_elastic.device import policy

JSON_NAME = "elastic_eval.json"
PNG_NAME = "elastic_eval.png"
TXT_NAME = "elastic_eval.txt"
SCHEMA_VERSION = 1


class EvalError(ValueError):
    """A request the evaluation cannot serve; the message says what to change."""


# ---------------------------------------------------------------------- settings
@dataclass
class Setting:
    """One inference configuration: a global k', a per-layer budget, or a top-p threshold."""

    kind: str  # "k" | "budget" | "top_p" | "train"
    k: Optional[int] = None
    budget: Optional[List[int]] = None
    top_p: Optional[float] = None

    @property
    def name(self) -> str:
        if self.kind == "k":
            return f"k'={self.k}"
        if self.kind == "budget":
            return "budget " + ",".join(str(k) for k in self.budget)
        if self.kind == "top_p":
            return f"top-p {self.top_p:g}"
        return "train routing"

    def apply(self, model) -> None:
        from megatron_elastic.moe.control import set_inference_k

        if self.kind == "k":
            set_inference_k(model, self.k)
        elif self.kind == "budget":
            set_inference_k(model, list(self.budget))
        elif self.kind == "top_p":
            set_inference_k(model, top_p=self.top_p)
        else:
            set_inference_k(model, None)


def parse_ks(text: Optional[str]) -> Optional[List[int]]:
    """``"1,2,3"`` or ``"1-4"`` or ``"1-4,6"`` -> sorted unique ints; None/empty -> None."""
    if text is None or not str(text).strip():
        return None
    out: List[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(-?\d+)\s*-\s*(-?\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                raise EvalError(f"--ks range '{part}' is empty (start > end)")
            out.extend(range(lo, hi + 1))
            continue
        try:
            out.append(int(part))
        except ValueError as exc:
            raise EvalError(f"--ks: '{part}' is not an integer or a range like 1-4") from exc
    return sorted(set(out))


def parse_budgets(text: Optional[str]) -> List[List[int]]:
    """``"4,2;1,4"`` -> [[4, 2], [1, 4]] (one list per budget, one k per MoE layer)."""
    if text is None or not str(text).strip():
        return []
    budgets = []
    for chunk in str(text).split(";"):
        chunk = chunk.strip()
        if not chunk:
            continue
        try:
            budgets.append([int(x) for x in chunk.replace(" ", ",").split(",") if x])
        except ValueError as exc:
            raise EvalError(
                f"--budgets: '{chunk}' is not a comma-separated list of ints (one k per MoE layer; "
                "separate budgets with ';', e.g. \"4,2;1,4\")"
            ) from exc
    return budgets


def parse_top_ps(text: Optional[str]) -> List[float]:
    if text is None or not str(text).strip():
        return []
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(float(part))
        except ValueError as exc:
            raise EvalError(f"--top-p: '{part}' is not a number in (0, 1]") from exc
    return out


def default_ks(cfg) -> List[int]:
    """1 .. 2*k_max, capped at the number of experts."""
    k_max = max(cfg.elastic_k_max, cfg.model.moe_router_topk)
    return list(range(1, min(2 * k_max, cfg.model.num_moe_experts) + 1))


def check_settings(ks: Sequence[int], budgets: Sequence[Sequence[int]], top_ps: Sequence[float],
                   num_layers: int, num_experts: int) -> None:
    """Reject anything the routers would refuse, naming the value and the allowed range."""
    for k in ks:
        if not 1 <= k <= num_experts:
            raise EvalError(f"k'={k} is out of range: it must lie in [1, num_moe_experts={num_experts}]")
    for budget in budgets:
        if len(budget) != num_layers:
            raise EvalError(
                f"budget {','.join(map(str, budget))} lists {len(budget)} values but the model has "
                f"{num_layers} MoE layers: give one k per layer, in depth order"
            )
        for k in budget:
            if not 1 <= k <= num_experts:
                raise EvalError(
                    f"budget {','.join(map(str, budget))}: k={k} must lie in [1, num_moe_experts={num_experts}]"
                )
    for p in top_ps:
        if not (0 < p <= 1):
            raise EvalError(f"top-p {p} must lie in (0, 1]")


# ---------------------------------------------------------------------- measurement
class _Tally:
    """Loss and per-layer routing statistics accumulated over micro-batches."""

    def __init__(self, num_layers: int, num_experts: int):
        self.loss_sum = torch.zeros(2, dtype=torch.float64)  # [sum of token losses, tokens]
        self.cooc = torch.zeros(num_layers, num_experts, num_experts, dtype=torch.float64)
        self.routed = torch.zeros(num_layers, dtype=torch.float64)  # tokens seen by each router

    def add_loss(self, per_token: torch.Tensor, mask: torch.Tensor) -> None:
        mask = mask.float()
        self.loss_sum[0] += float((per_token.float() * mask).sum())
        self.loss_sum[1] += float(mask.sum())

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

    routers = sorted(elastic_routers(model), key=lambda r: r.layer_number or 0)
    num_experts = routers[0].num_experts
    tally = _Tally(len(routers), num_experts)
    context = _unwrap(model).elastic_context
    was_training = model.training
    previous = [r.record_routing for r in routers]
    for r in routers:
        r.record_routing = True
    model.train(train_routing)
    try:
        with torch.no_grad():
            for it in range(eval_iters):
                for mb in range(reader.num_microbatches):
                    context.set(it, mb, reader.sample_offset(mb))
                    batch = policy().to_device(reader.get(it, mb))
                    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
                    tally.add_loss(per_token, batch["loss_mask"])
                    for layer, router in enumerate(routers):
                        if router.last_routing_map is None:
                            raise RuntimeError(f"router of layer {router.layer_number} recorded no routing")
                        tally.add_routing(layer, router.last_routing_map)
                        router.last_routing_map = None
    finally:
        for r, rec in zip(routers, previous):
            r.record_routing = rec
        model.train(was_training)
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()
    tally.all_reduce()
    return tally


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
    inference k is restored afterwards. See the module docstring and ``docs/elastic_eval.md`` for
    the fields.
    """
    from megatron_elastic.moe.control import inference_k, set_inference_k
    from megatron_elastic.moe.router import elastic_routers

    routers = sorted(elastic_routers(model), key=lambda r: r.layer_number or 0)
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


# ---------------------------------------------------------------------- reporting
def format_table(results: dict) -> str:
    """Fixed-width text table: one row per setting, then the training-routing reference."""
    has_train = results.get("train_routing") is not None
    header = ["setting", "k per layer", "mean k", "loss", "ppl", "d loss", "||dM||_F"]
    if has_train:
        header.append("||M-M_train||_F")
    rows = []

    def row(entry: dict, mark: str = "") -> List[str]:
        per_layer = entry.get("k_per_layer")
        if per_layer is None:
            per_layer_s = "/".join(f"{k:.2f}" for k in entry["mean_k_per_layer"])
        else:
            per_layer_s = ",".join(str(k) for k in per_layer)
        cells = [entry["name"] + mark, per_layer_s, f"{entry['mean_k']:.2f}", f"{entry['loss']:.4f}",
                 f"{entry['ppl']:.2f}", _signed(entry["delta_loss"]), f"{entry['cooc_dist']:.4f}"]
        if has_train:
            cells.append(f"{entry['cooc_dist_train']:.4f}")
        return cells

    for entry in results["results"]:
        rows.append(row(entry, " *" if entry.get("is_k_train") else ""))
    if not any(e.get("is_k_train") for e in results["results"]):
        rows.append(row(results["reference"], " *"))
    if has_train:
        rows.append(row(results["train_routing"]))
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(cells))

    e, ev = results["elastic"], results["eval"]
    title = (f"elastic eval: schedule {e['schedule']} k in [{e['k_min']}, {e['k_max']}]"
             + (f", pool x{e['pool_ratio']:g}" if e.get("pool_ratio") else "")
             + (f", router loss {e['router_loss_coeff']:g}" if e.get("router_loss_coeff") else "")
             + f" | {results['model']['num_moe_experts']} experts, {results['model']['num_moe_layers']} MoE layers"
             + f" | {ev['tokens']:,} tokens ({ev['eval_iters']} x {ev['global_batch_size']} sequences)")
    if results.get("checkpoint"):
        title += f"\ncheckpoint: {results['checkpoint']}" + (
            f" (iteration {results['iteration']})" if results.get("iteration") is not None else "")
    lines = [title, line(header), line(["-" * w for w in widths])]
    lines += [line(r) for r in rows]
    lines.append(
        "* = k_train (the model's default inference k: training k, or k_max for varying schedules). "
        "d loss and ||dM||_F are relative to it; M = per-layer expert co-occurrence (share of tokens "
        "activating both experts), distances averaged over layers"
        + ("; M_train = co-occurrence of the training routing (schedule draws, candidate-pool sampling)."
           if has_train else ".")
    )
    return "\n".join(lines) + "\n"


def _signed(x: float) -> str:
    text = f"{x:+.4f}"
    return "+0.0000" if text == "-0.0000" else text


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(results: dict, path) -> Path:
    """Strict JSON (non-finite numbers become null), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def plot(results: dict, path) -> Path:
    """Loss (and perplexity) vs k', budgets and top-p as separate markers, k_train marked;
    right panel: co-occurrence distance vs k'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = results["results"]
    ks = [e for e in entries if e["kind"] == "k"]
    budgets = [e for e in entries if e["kind"] == "budget"]
    top_ps = [e for e in entries if e["kind"] == "top_p"]
    e = results["elastic"]
    ref = results["reference"]
    train = results.get("train_routing")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))

    def decorate(axis):
        if e["k_min"] != e["k_max"]:
            axis.axvspan(e["k_min"] - 0.5, e["k_max"] + 0.5, color="tab:green", alpha=0.08,
                         label=f"trained k range [{e['k_min']}, {e['k_max']}]")
        axis.axvline(ref["mean_k"], color="tab:red", linestyle="--", linewidth=1,
                     label=f"k_train = {ref['mean_k']:g}")
        axis.set_xlabel("activated experts per token, k' (budgets/top-p: mean over layers)")
        axis.grid(True, alpha=0.3)

    def finite(vals):
        return [v if v is not None and math.isfinite(v) else float("nan") for v in vals]

    for axis, key, ylabel in ((ax, "loss", "validation loss"),
                              (ax2, "cooc_dist", "||M(k') - M(k_train)||_F (mean over layers)")):
        decorate(axis)
        if ks:
            axis.plot([x["k"] for x in ks], finite([x[key] for x in ks]), "o-", color="tab:blue",
                      label="global k'")
        if budgets:
            axis.scatter([x["mean_k"] for x in budgets], finite([x[key] for x in budgets]), marker="s",
                         s=60, color="tab:orange", zorder=3, label="per-layer budget")
            _annotate(axis, [(x["mean_k"], x[key], ",".join(map(str, x["budget"]))) for x in budgets])
        if top_ps:
            axis.scatter([x["mean_k"] for x in top_ps], finite([x[key] for x in top_ps]), marker="^",
                         s=60, color="tab:purple", zorder=3, label="top-p")
            _annotate(axis, [(x["mean_k"], x[key], f"p={x['top_p']:g}") for x in top_ps])
        axis.set_ylabel(ylabel)
    if ks:
        ax.set_xticks(sorted({x["k"] for x in ks}))
        ax2.set_xticks(sorted({x["k"] for x in ks}))
    if train is not None:
        ax.axhline(train["loss"], color="gray", linestyle=":", linewidth=1,
                   label=f"training routing ({train['loss']:.3f})")
        if ks:
            ax2.plot([x["k"] for x in ks], finite([x["cooc_dist_train"] for x in ks]), "x--",
                     color="gray", label="||M(k') - M_train||_F")
    try:
        secondary = ax.secondary_yaxis("right", functions=(
            lambda y: torch.exp(torch.as_tensor(y, dtype=torch.float64).clamp(max=700)).numpy(),
            lambda p: torch.log(torch.as_tensor(p, dtype=torch.float64).clamp(min=1e-300)).numpy()))
        secondary.set_ylabel("perplexity")
    except Exception:  # noqa: BLE001 - the secondary axis is decoration only
        pass
    ax.legend(fontsize=8, loc="best")
    ax2.legend(fontsize=8, loc="best")
    title = (f"elastic eval - schedule {e['schedule']} k in [{e['k_min']}, {e['k_max']}]"
             + (f", pool x{e['pool_ratio']:g}" if e.get("pool_ratio") else "")
             + (f", router loss {e['router_loss_coeff']:g}" if e.get("router_loss_coeff") else ""))
    if results.get("checkpoint"):
        title += f"\n{results['checkpoint']}"
        if results.get("iteration") is not None:
            title += f" (iteration {results['iteration']})"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _annotate(axis, points) -> None:
    """Label markers; coincident points share one label. A label goes above its marker unless a
    close neighbour of the same series sits higher, then below, so labels never swap places."""
    groups: Dict[tuple, List[str]] = {}
    for x, y, label in points:
        if y is None or not math.isfinite(y):
            continue
        groups.setdefault((round(x, 6), round(y, 6)), []).append(label)
    lo, hi = axis.get_ylim()
    near_y = 0.08 * (hi - lo)
    for (x, y), labels in groups.items():
        higher = any(abs(qx - x) < 0.3 and y < qy < y + near_y for qx, qy in groups)
        axis.annotate("; ".join(labels), (x, y), fontsize=8, textcoords="offset points",
                      xytext=(6, -11) if higher else (6, 4))


def write_outputs(results: dict, output_dir) -> Dict[str, Path]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    (output_dir / TXT_NAME).write_text(table)
    paths = {"json": write_json(results, output_dir / JSON_NAME), "txt": output_dir / TXT_NAME}
    try:
        paths["png"] = plot(results, output_dir / PNG_NAME)
    except ImportError as exc:  # matplotlib is the optional 'plots' extra of the package
        print(f"warning: no plot written ({exc}); pip install matplotlib (or megatron-elastic[plots])",
              file=sys.stderr, flush=True)
    return paths


# ---------------------------------------------------------------------- command line
def _load_run_config(ckpt_dir: Path, config_path: Optional[str], overrides: List[str]):
    """The checkpoint's own config (or ``--config``) with command-line overrides, validated."""
    from megatron_elastic.config import Config, load_config

    if config_path is not None:
        return load_config(config_path, overrides)
    run_config = ckpt_dir / "run_config.yaml"
    if run_config.is_file():
        return load_config(run_config, overrides)
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(str(ckpt_dir))
    except Exception as exc:  # noqa: BLE001
        raise EvalError(
            f"{ckpt_dir} has no run_config.yaml and its common state cannot be read ({exc}); "
            "pass --config with the recipe the checkpoint was trained with"
        ) from exc
    raw = common.get("config") if isinstance(common, dict) else None
    if raw is None:
        raise EvalError(f"{ckpt_dir} stores no config: pass --config with the training recipe")
    cfg = Config.from_dict(raw, source=f"{ckpt_dir} (saved config)")
    if overrides:
        cfg = cfg.apply_overrides(overrides)
    return cfg.validate()


def _single_process() -> bool:
    world = os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
    return int(world) == 1


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tools/elastic_eval.py",
        description=(
            "Validation loss and perplexity of an elastic MoE checkpoint at every inference k', "
            "per-layer budget and top-p threshold, with the expert co-occurrence diagnostic. "
            "Writes elastic_eval.txt (table), elastic_eval.json and elastic_eval.png."
        ),
    )
    parser.add_argument("--load", required=True,
                        help="checkpoint: a run's checkpoint root (uses the latest tracker) or one iter_N dir")
    parser.add_argument("--config", default=None,
                        help="recipe YAML (default: the checkpoint's own run_config.yaml)")
    parser.add_argument("--ks", default=None,
                        help="global k' values, e.g. 1,2,3,4 or 1-8 (default 1..2*k_max, capped at the expert count)")
    parser.add_argument("--budgets", default=None,
                        help="per-layer budgets, one k per MoE layer, ';'-separated, e.g. \"4,2;1,4\"")
    parser.add_argument("--top-p", dest="top_p", default=None,
                        help="top-p thresholds, e.g. 0.5,0.9 (per-token k clipped to the trained [k_min, k_max])")
    parser.add_argument("--eval-iters", type=int, default=None,
                        help="global batches to evaluate per setting (default: the config's train.eval_iters)")
    parser.add_argument("--split", choices=("valid", "test"), default="valid", help="dataset split (default valid)")
    parser.add_argument("--output-dir", default=None,
                        help="where to write the outputs (default <checkpoint root>/elastic_eval/iter_N)")
    parser.add_argument("--no-train-reference", dest="train_reference", action="store_false",
                        help="skip the training-routing pass (M_train, cooc_dist_train)")
    parser.add_argument("--save-matrices", action="store_true",
                        help="store every setting's per-layer co-occurrence matrices in the JSON")
    parser.add_argument("overrides", nargs="*",
                        help="section.key=value overrides, e.g. data.data_path=[runs/x/data/corpus_text_document]")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from megatron_elastic import parallel
    from megatron_elastic.config import ConfigError
    from megatron_elastic.data.tokenizer import SentencePieceTokenizer
    from megatron_elastic.models.gpt import build_model
    from megatron_elastic.training.checkpoint import load_checkpoint, resolve_load_dir
    from megatron_elastic.training.data import BatchReader, build_datasets

    load = Path(args.load)
    if not load.exists():
        raise EvalError(f"--load {load}: no such checkpoint directory")
    ckpt_dir = resolve_load_dir(load)
    if ckpt_dir is None:
        raise EvalError(
            f"--load {load}: no checkpoint found (no latest_checkpointed_iteration.txt and no "
            "metadata.json); point it at a run's checkpoint root or at one iter_N directory"
        )
    ks = parse_ks(args.ks)
    budgets = parse_budgets(args.budgets)
    top_ps = parse_top_ps(args.top_p)

    overrides = list(args.overrides)
    if _single_process():
        # dist_checkpointing reshards: a checkpoint saved under TP/EP/DP loads into one process.
        overrides = [
            "parallel.tensor_model_parallel_size=1", "parallel.expert_model_parallel_size=1",
            "parallel.expert_tensor_parallel_size=1", "parallel.sequence_parallel=false",
        ] + overrides
    overrides += ["checkpoint.save=null", f"checkpoint.load={ckpt_dir}", "checkpoint.finetune=false",
                  "logging.tensorboard_dir=null", "logging.wandb_project=null"]
    if args.eval_iters is not None:
        if args.eval_iters < 1:
            raise EvalError(f"--eval-iters {args.eval_iters} must be >= 1")
        overrides.append(f"train.eval_iters={args.eval_iters}")
    cfg = _load_run_config(ckpt_dir, args.config, overrides)
    if ks is None:
        ks = default_ks(cfg)
    check_settings(ks, budgets, top_ps, cfg.model.num_layers, cfg.model.num_moe_experts)

    from megatron.core import parallel_state as ps
    from megatron_elastic.train import check_environment

    env = parallel.initialize(cfg)
    check_environment(cfg)
    torch.manual_seed(cfg.train.seed)
    tokenizer = SentencePieceTokenizer(cfg.data.tokenizer_model)
    model = build_model(cfg, tokenizer.vocab_size)
    common_iteration = load_checkpoint(ckpt_dir, model, None, cfg, finetune=False)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    datasets = build_datasets(cfg, tokenizer, dp_size)
    dataset = datasets[1] if args.split == "valid" else datasets[2]
    if dataset is None:
        raise ConfigError(
            f"the {args.split} split is empty under data.split={cfg.data.split!r}: pass "
            f"data.split=... (e.g. 90,5,5) or --split valid"
        )
    t = cfg.train
    reader = BatchReader(dataset, t.micro_batch_size, t.global_batch_size, dp_rank, dp_size)
    say = (lambda msg: print(msg, flush=True)) if env.rank == 0 else None
    if say:
        say(f"elastic eval of {ckpt_dir} (iteration {common_iteration}) | schedule {cfg.elastic.schedule} "
            f"k in [{cfg.elastic_k_min}, {cfg.elastic_k_max}] | {t.eval_iters} x {t.global_batch_size} "
            f"{args.split} sequences per setting | world {env.world_size}")
    results = sweep(model, reader, cfg, ks=ks, budgets=budgets, top_ps=top_ps, eval_iters=t.eval_iters,
                    train_reference=args.train_reference, keep_matrices=args.save_matrices, progress=say)
    results["checkpoint"] = str(ckpt_dir)
    results["iteration"] = common_iteration
    results["eval"]["split"] = args.split
    results["eval"]["world_size"] = env.world_size
    results["rank"] = env.rank
    return results


def default_output_dir(ckpt_dir: Path) -> Path:
    ckpt_dir = Path(ckpt_dir)
    return ckpt_dir.parent / "elastic_eval" / ckpt_dir.name


def main(argv=None) -> int:
    from megatron_elastic import parallel
    from megatron_elastic.config import ConfigError
    from megatron_elastic.training.checkpoint import CheckpointError

    os.environ.setdefault("WANDB_MODE", "disabled")
    args = parse_args(argv)
    try:
        results = run(args)
        if results.pop("rank", 0) == 0:
            out = Path(args.output_dir) if args.output_dir else default_output_dir(Path(results["checkpoint"]))
            paths = write_outputs(results, out)
            print(paths["txt"].read_text(), end="", flush=True)
            print("wrote " + ", ".join(str(p) for p in paths.values()), flush=True)
    except (EvalError, ConfigError, CheckpointError, parallel.RendezvousError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
