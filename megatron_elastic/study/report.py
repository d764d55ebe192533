"""The study report, rebuilt from the stored per-run result files alone: ``report.md``,
``results.json`` (every number the report shows) and plots, in the study's results_dir.

Per protocol and arm, over seeds: mean and half-range (|a - b| / 2 for two seeds; for more,
half of max - min) of the held-out (test) loss at every k'; the specialists' envelope (the
fixed-k arm trained at k, evaluated at k); each arm's relative gap to it; the "scaling wall"
(loss at k' > k_ref minus loss at k_ref); training FLOPs from the realised k; router
diagnostics; the per-layer budget search against uniform k' at equal FLOPs; and checks of the
papers' claims, each stated with the numbers and seed spread it rests on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from megatron_elastic.study.spec import PROTOCOLS, Study

SPECIALIST_PREFIX = "k"


def _stats(values: Sequence[float]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "spread": None, "n": 0, "values": []}
    return {"mean": sum(vals) / len(vals), "spread": (max(vals) - min(vals)) / 2, "n": len(vals),
            "values": vals}


def load_results(study: Study) -> List[dict]:
    out = []
    for path in sorted((study.results_dir / "runs").glob("*.json")):
        out.append(json.loads(path.read_text()))
    return out


def specialist_k(arm: str, results: List[dict]) -> Optional[int]:
    """The k a fixed-k specialist arm was trained at (arms named k<N> with a fixed schedule)."""
    if not (arm.startswith(SPECIALIST_PREFIX) and arm[1:].isdigit()):
        return None
    for r in results:
        if r["run"]["arm"] == arm and r["elastic"]["schedule"] == "fixed" and not r["elastic"]["pool_ratio"]:
            return int(r["elastic"]["k_max"])
    return None


def aggregate(study: Study, results: List[dict]) -> dict:
    """Everything the report shows, by protocol: arms -> per-k' statistics and derived values."""
    out: Dict[str, dict] = {}
    for protocol in PROTOCOLS:
        rows = [r for r in results if r["run"]["protocol"] == protocol and not r["run"].get("base_of")]
        if not rows:
            continue
        arms: Dict[str, dict] = {}
        order = [a for a in study.protocols[protocol].arms] if protocol in study.protocols else []
        for name in order + sorted({r["run"]["arm"] for r in rows} - set(order)):
            runs = [r for r in rows if r["run"]["arm"] == name]
            if not runs:
                continue
            ks = sorted({int(k) for r in runs for k in r["loss"]["test"]})
            first = runs[0]
            arm = {
                "description": first["run"].get("description", ""),
                "seeds": sorted(r["run"]["seed"] for r in runs),
                "k_ref": first["k_ref"],
                "elastic": first["elastic"],
                "test": {k: _stats([r["loss"]["test"].get(str(k)) for r in runs]) for k in ks},
                "valid": {k: _stats([r["loss"]["valid"].get(str(k)) for r in runs]) for k in ks},
                "train_flops": _stats([r["train"].get("train_flops") for r in runs]),
                "train_mean_k": _stats([sum(r["train"]["mean_k_per_layer"]) / len(r["train"]["mean_k_per_layer"])
                                        for r in runs if r["train"].get("mean_k_per_layer")]),
                "train_wall_s": _stats([r["train"].get("train_wall_s") for r in runs]),
                "flops_per_token": {int(k): v for k, v in first["flops_per_token"].items()},
                "diagnostics": _diagnostics(runs, ks),
                "budgets": _budgets(runs),
            }
            arms[name] = arm
        envelope = {}
        for name in arms:
            k = specialist_k(name, rows)
            if k is not None and k in arms[name]["test"]:
                envelope[k] = {"arm": name, **arms[name]["test"][k]}
        for arm in arms.values():
            arm["gap_to_specialist_pct"] = {
                k: 100.0 * (arm["test"][k]["mean"] - envelope[k]["mean"]) / envelope[k]["mean"]
                for k in arm["test"] if k in envelope and arm["test"][k]["mean"] is not None}
            ref = arm["test"].get(arm["k_ref"])
            arm["scaling_wall"] = {k: {"mean": s["mean"] - ref["mean"],
                                       "per_seed": [a - b for a, b in zip(s["values"], ref["values"])]}
                                   for k, s in arm["test"].items() if ref and k > arm["k_ref"]}
            arm["budget_vs_uniform"] = _budget_vs_uniform(arm)
        base = [r for r in results if r["run"]["protocol"] == protocol and r["run"].get("base_of")]
        out[protocol] = {"arms": arms, "envelope": envelope,
                         "base": ({"arm": base[0]["run"]["arm"], "test": base[0]["loss"]["test"],
                                   "train": base[0]["train"]} if base else None)}
    return out


def _diagnostics(runs: List[dict], ks: List[int]) -> Dict[int, dict]:
    out = {}
    for k in ks:
        entries = [r["diagnostics"].get(str(k), {}).get("mean") for r in runs]
        entries = [e for e in entries if e]
        if entries:
            out[k] = {key: sum(e[key] for e in entries if key in e) / sum(1 for e in entries if key in e)
                      for key in entries[0]}
    return out


def _budgets(runs: List[dict]) -> Dict[float, dict]:
    """Searched budgets per target mean k: test loss statistics (each seed searches its own)."""
    by_target: Dict[float, list] = {}
    for r in runs:
        for b in (r.get("budget_search") or {}).get("budgets", []):
            by_target.setdefault(float(b["target_mean_k"]), []).append(b)
    return {t: {"test": _stats([b["test_loss"] for b in bs]), "budgets": [b["budget"] for b in bs],
                "mean_k": _stats([b["mean_k"] for b in bs])} for t, bs in sorted(by_target.items())}


def uniform_at(arm: dict, mean_k: float) -> Optional[float]:
    """Uniform-k' test loss at a (possibly fractional) mean k: linear between the neighbouring
    integer k' (the cost of a mix of uniform settings), None outside the measured range."""
    lo, hi = math.floor(mean_k), math.ceil(mean_k)
    t = arm["test"]
    if lo not in t or hi not in t or t[lo]["mean"] is None or t[hi]["mean"] is None:
        return None
    if lo == hi:
        return t[lo]["mean"]
    w = mean_k - lo
    return (1 - w) * t[lo]["mean"] + w * t[hi]["mean"]


def _budget_vs_uniform(arm: dict) -> Dict[float, dict]:
    out = {}
    for target, b in arm["budgets"].items():
        uni = uniform_at(arm, b["mean_k"]["mean"])
        if uni is not None and b["test"]["mean"] is not None:
            out[target] = {"budget_loss": b["test"]["mean"], "uniform_loss": uni,
                           "delta": b["test"]["mean"] - uni, "mean_k": b["mean_k"]["mean"]}
    return out


# ---------------------------------------------------------------------- claims
def claims(agg: dict) -> List[dict]:
    """The papers' claims, each checked on every protocol that has the arms it needs."""
    out = []
    for protocol, data in agg.items():
        arms = data["arms"]

        def add(claim: str, holds: Optional[bool], evidence: str) -> None:
            out.append({"protocol": protocol, "claim": claim, "holds": holds, "evidence": evidence})

        topk = next((a for n, a in arms.items() if n == "k2"), None)
        if topk:
            wall = topk["scaling_wall"]
            if wall:
                worst = max(wall, key=lambda k: wall[k]["mean"])
                seeds_agree = all(all(v > 0 for v in w["per_seed"]) for w in wall.values())
                add("Top-k degrades beyond k_train (a scaling wall)",
                    seeds_agree,
                    "loss(k') - loss(k_train=2), per k' (mean; per seed): " + "; ".join(
                        f"k'={k}: {w['mean']:+.4f} ({', '.join(f'{v:+.4f}' for v in w['per_seed'])})"
                        for k, w in wall.items()) + f"; largest at k'={worst}")
        for name, a in arms.items():
            if a["elastic"]["pool_ratio"] and a["elastic"]["schedule"] == "fixed":
                kt = a["k_ref"]
                better = {k: s for k, s in a["scaling_wall"].items() if k <= 3 * kt}
                if better:
                    kbest = min(better, key=lambda k: better[k]["mean"])
                    holds = all(v < 0 for v in better[kbest]["per_seed"])
                    vs = ""
                    if topk and kbest in topk["test"]:
                        vs = (f"; at k'={kbest} vs Top-k: {a['test'][kbest]['mean'] - topk['test'][kbest]['mean']:+.4f}")
                    add(f"EMoE ({name}) improves beyond k_train, up to 2-3 x k_train", holds,
                        f"best k'={kbest}: loss(k') - loss(k_train) = {better[kbest]['mean']:+.4f} "
                        f"(seeds {', '.join(f'{v:+.4f}' for v in better[kbest]['per_seed'])}){vs}")
        for name, a in arms.items():
            if a["elastic"]["schedule"] == "layerwise" and not a["elastic"]["pool_ratio"]:
                gaps = a["gap_to_specialist_pct"]
                if gaps:
                    worst = max(gaps.values())
                    add(f"M-MoE layer-wise ({name}) within ~1% of each specialist across its range",
                        worst <= 1.0, "gap to the specialist at k: " + ", ".join(
                            f"k={k}: {g:+.2f}%" for k, g in sorted(gaps.items())))
        lw = arms.get("mmoe_layerwise")
        for other in ("mmoe_batch", "mmoe_microbatch"):
            o = arms.get(other)
            if lw and o:
                common = [k for k in range(lw["elastic"]["k_min"], lw["elastic"]["k_max"] + 1)
                          if k in lw["test"] and k in o["test"]]
                d = [lw["test"][k]["mean"] - o["test"][k]["mean"] for k in common]
                spread = max(max(lw["test"][k]["spread"], o["test"][k]["spread"]) for k in common)
                add(f"layer-wise beats {other.split('_')[1]}-level variation", sum(d) / len(d) < -spread,
                    f"mean over k={common[0]}..{common[-1]} of loss(layerwise) - loss({other}) = "
                    f"{sum(d) / len(d):+.4f} (largest seed half-range {spread:.4f})")
        comb = arms.get("combined")
        if comb and lw:
            alone = [n for n in arms if n.startswith("emoe_p2")]
            common = [k for k in range(1, lw["elastic"]["k_max"] + 1) if k in comb["test"] and k in lw["test"]]
            d = sum(comb["test"][k]["mean"] - lw["test"][k]["mean"] for k in common) / len(common)
            ev = f"mean over k=1..{common[-1]} of loss(combined) - loss(mmoe_layerwise) = {d:+.4f}"
            for n in alone:
                dd = sum(comb["test"][k]["mean"] - arms[n]["test"][k]["mean"] for k in common) / len(common)
                ev += f"; - loss({n}) = {dd:+.4f}"
            add("the combined recipe is at least as good as either alone", d <= 0, ev)
        for name, a in arms.items():
            for target, c in a["budget_vs_uniform"].items():
                add(f"budget search beats uniform k' at equal FLOPs ({name}, mean k {c['mean_k']:g})",
                    c["delta"] < 0, f"test loss {c['budget_loss']:.4f} vs uniform {c['uniform_loss']:.4f} "
                    f"({c['delta']:+.4f})")
    return out


# ---------------------------------------------------------------------- output
def _fmt(s: dict, star: bool = False) -> str:
    if s is None or s["mean"] is None:
        return "-"
    text = f"{s['mean']:.4f}"
    if s["n"] > 1:
        text += f" ±{s['spread']:.4f}"
    return text + ("*" if star else "")


def markdown(study: Study, agg: dict, claim_list: List[dict]) -> str:
    lines = [f"# {study.title}", "",
             f"Generated by `python tools/elastic_study.py report --spec {_rel(study.path)}` from "
             f"{sum(len(a['seeds']) for p in agg.values() for a in p['arms'].values())} run results in "
             f"`{_rel(study.results_dir / 'runs')}`. Loss: nats/token on the held-out test files "
             "(the same tokens for every run), mean over seeds ± half the seed range; * = the arm's "
             "default k. Specialists are the fixed-k arms `k<N>`.", ""]
    for protocol, data in agg.items():
        arms = data["arms"]
        ks = sorted({k for a in arms.values() for k in a["test"]})
        lines += [f"## Protocol: {protocol}", ""]
        if data["base"]:
            lines += [f"Base ({data['base']['arm']}, trained once): test loss at k'=2 "
                      f"{data['base']['test'].get('2', float('nan')):.4f}.", ""]
        lines += ["| arm | seeds | " + " | ".join(f"k'={k}" for k in ks) + " |",
                  "|---|---|" + "---|" * len(ks)]
        for name, a in arms.items():
            lines.append(f"| {name} | {len(a['seeds'])} | " + " | ".join(
                _fmt(a["test"].get(k), k == a["k_ref"]) for k in ks) + " |")
        env = data["envelope"]
        if env:
            lines.append("| *specialists' envelope* | | " + " | ".join(
                _fmt(env[k]) if k in env else "-" for k in ks) + " |")
        lines += ["", "Perplexity (exp of the mean loss):", "",
                  "| arm | " + " | ".join(f"k'={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for name, a in arms.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{math.exp(a['test'][k]['mean']):.2f}" if a["test"].get(k) and a["test"][k]["mean"] is not None
                else "-" for k in ks) + " |")
            lines += ["", "Relative gap to the specialist at k (%, + = worse):", "",
                      "| arm | " + " | ".join(f"k={k}" for k in sorted(env)) + " |",
                      "|---|" + "---|" * len(env)]
            for name, a in arms.items():
                lines.append(f"| {name} | " + " | ".join(
                    f"{a['gap_to_specialist_pct'][k]:+.2f}" if k in a["gap_to_specialist_pct"] else "-"
                    for k in sorted(env)) + " |")
        lines += ["", "Scaling wall (loss at k' minus loss at the default k; + = worse), and training cost:", "",
                  "| arm | default k | " + " | ".join(f"k'={k}" for k in ks) + " | train mean k | train TFLOP | train step s |",
                  "|---|---|" + "---|" * len(ks) + "---|---|---|"]
        for name, a in arms.items():
            wall = a["scaling_wall"]
            lines.append(f"| {name} | {a['k_ref']} | " + " | ".join(
                f"{wall[k]['mean']:+.4f}" if k in wall else "" for k in ks)
                + f" | {_num(a['train_mean_k']['mean'], 2)} | {_num(_div(a['train_flops']['mean'], 1e12), 2)}"
                + f" | {_num(a['train_wall_s']['mean'], 0)} |")
        lines += ["", "Router diagnostics on the calibration files (mean over layers and seeds): expert load "
                  "CV, router entropy (nats; uniform = log E), Spearman correlation of the router scores "
                  "with those at the default k, share of tokens whose top-k' set lies in their top-(k'+1) "
                  "set of the k'+1 run, co-occurrence distance to the default k:", "",
                  "| arm | k' | load CV | max/mean | entropy | Spearman | nested in k'+1 | cooc dist |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, a in arms.items():
            for k, d in a["diagnostics"].items():
                lines.append(f"| {name} | {k} | {_num(d.get('load_cv'), 3)} | {_num(d.get('load_max_over_mean'), 2)} | "
                             f"{_num(d.get('entropy'), 3)} | {_num(d.get('spearman_vs_ref'), 3)} | "
                             f"{_num(d.get('containment_in_next'), 3)} | {_num(d.get('cooc_dist_to_ref'), 3)} |")
        corr = data.get("cooc_loss_correlation")
        if corr:
            lines += ["", f"EMoE's predictor: over every run and k' != default k, the co-occurrence distance "
                      f"to the default k's routing and the loss change have Pearson r = {corr['pearson']:.3f} "
                      f"({corr['points']} points; plot `cooc_vs_loss_{protocol}.png`)."]
        rows = [(n, t, c) for n, a in arms.items() for t, c in a["budget_vs_uniform"].items()]
        if rows:
            lines += ["", "Per-layer budget search (greedy on the calibration files, scored on the test "
                      "files) vs uniform k' at equal FLOPs (fractional mean k: linear between the "
                      "neighbouring uniform k'):", "",
                      "| arm | target mean k | budgets (per seed) | budget loss | uniform loss | delta |",
                      "|---|---|---|---|---|---|"]
            for n, t, c in rows:
                budgets = "; ".join(",".join(map(str, b)) for b in arms[n]["budgets"][t]["budgets"])
                lines.append(f"| {n} | {t:g} | {budgets} | {c['budget_loss']:.4f} | {c['uniform_loss']:.4f} | "
                             f"{c['delta']:+.4f} |")
        lines.append("")
    if claim_list:
        lines += ["## The papers' claims at this scale", "",
                  "| protocol | claim | holds | evidence |", "|---|---|---|---|"]
        for c in claim_list:
            verdict = {True: "yes", False: "**no**", None: "n/a"}[c["holds"]]
            lines.append(f"| {c['protocol']} | {c['claim']} | {verdict} | {c['evidence']} |")
        lines.append("")
    lines += ["## Arms", ""] + [f"* `{a.name}`: {a.description} (`{' '.join(a.overrides)}`)"
                                for a in study.arms.values()] + [""]
    return "\n".join(lines)


def _num(v, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _div(a, b):
    return None if a is None else a / b


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def plots(study: Study, agg: dict, results: List[dict]) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: List[Path] = []
    d = study.results_dir
    for protocol, data in agg.items():
        arms = data["arms"]
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for name, a in arms.items():
            ks = sorted(a["test"])
            mean = [a["test"][k]["mean"] for k in ks]
            lo = [min(a["test"][k]["values"]) for k in ks]
            hi = [max(a["test"][k]["values"]) for k in ks]
            line, = ax.plot(ks, mean, marker="o", ms=3, lw=1, label=name)
            ax.fill_between(ks, lo, hi, color=line.get_color(), alpha=0.15)
        env = data["envelope"]
        if env:
            ek = sorted(env)
            ax.plot(ek, [env[k]["mean"] for k in ek], "k--", lw=2, label="specialists' envelope")
        ax.set_xlabel("inference k' (experts per token, every layer)")
        ax.set_ylabel("test loss (nats/token)")
        ax.set_title(f"{study.title}\n{protocol}: loss vs k' (bands: seed range)", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
        out.append(_save(fig, d / f"loss_vs_k_{protocol}.png"))

        fig, ax = plt.subplots(figsize=(8, 5))
        for name, a in arms.items():
            ks = sorted(a["test"])
            line, = ax.plot([a["flops_per_token"][k] / 1e6 for k in ks], [a["test"][k]["mean"] for k in ks],
                            marker="o", ms=3, lw=1, label=name)
            for t, b in a["budgets"].items():
                fl = [r["budget_search"]["budgets"] for r in results
                      if r["run"]["protocol"] == protocol and r["run"]["arm"] == name and r.get("budget_search")]
                xs = [e["flops"] / 1e6 for bs in fl for e in bs if float(e["target_mean_k"]) == t]
                ys = [e["test_loss"] for bs in fl for e in bs if float(e["target_mean_k"]) == t]
                ax.scatter(xs, ys, marker="x", color=line.get_color(), s=25)
        ax.set_xlabel("active forward MFLOPs per token (x = searched per-layer budget)")
        ax.set_ylabel("test loss")
        ax.set_title(f"{protocol}: cost vs quality (Pareto)", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
        out.append(_save(fig, d / f"pareto_{protocol}.png"))

        xs, ys = [], []
        for r in results:
            if r["run"]["protocol"] != protocol or r["run"].get("base_of"):
                continue
            ref = r["loss"]["valid"][str(r["k_ref"])]
            for k, dd in r["diagnostics"].items():
                if "cooc_dist_to_ref" in dd["mean"] and int(k) != r["k_ref"]:
                    xs.append(dd["mean"]["cooc_dist_to_ref"])
                    ys.append(r["loss"]["valid"][k] - ref)
        if len(xs) > 2:
            fig, ax = plt.subplots(figsize=(6, 4.5))
            ax.scatter(xs, ys, s=10)
            rho = _pearson(xs, ys)
            data["cooc_loss_correlation"] = {"pearson": rho, "points": len(xs)}
            ax.set_xlabel("co-occurrence distance to the default k (mean over layers)")
            ax.set_ylabel("loss change vs the default k (valid)")
            ax.set_title(f"{protocol}: EMoE's predictor, Pearson r = {rho:.3f} ({len(xs)} points)", fontsize=9)
            out.append(_save(fig, d / f"cooc_vs_loss_{protocol}.png"))

        fig, ax = plt.subplots(figsize=(8, 4))
        names = list(arms)
        ax.barh(names, [(arms[n]["train_flops"]["mean"] or 0) / 1e12 for n in names])
        ax.set_xlabel("training TFLOPs (from the realised k)")
        ax.set_title(f"{protocol}: training cost per arm", fontsize=9)
        fig.tight_layout()
        out.append(_save(fig, d / f"train_cost_{protocol}.png"))
    return out


def _pearson(xs, ys) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(study: Study) -> List[Path]:
    results = load_results(study)
    study.results_dir.mkdir(parents=True, exist_ok=True)
    agg = aggregate(study, results)
    paths = plots(study, agg, results) if results else []
    claim_list = claims(agg)
    md = study.results_dir / "report.md"
    md.write_text(markdown(study, agg, claim_list))
    js = study.results_dir / "results.json"
    js.write_text(json.dumps({"study": study.title, "protocols": agg, "claims": claim_list},
                             indent=1, default=str))
    return [md, js] + paths
