"""Elastic evaluation report: the results of a sweep as a text table, strict JSON and a plot.

``format_table`` (fixed-width, one row per setting, k_train marked), ``write_json`` (non-finite
numbers become null, written atomically), ``plot`` (loss and co-occurrence distance vs k', budgets
and top-p as separate markers; needs matplotlib) and ``write_outputs`` (all three into one
directory as ``elastic_eval.txt`` / ``.json`` / ``.png``).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Dict, List

import torch

JSON_NAME = "elastic_eval.json"
PNG_NAME = "elastic_eval.png"
TXT_NAME = "elastic_eval.txt"


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
