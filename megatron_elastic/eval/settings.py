"""Elastic evaluation settings: what one measurement runs at, parsed and checked.

A ``Setting`` is a global k' (every MoE layer activates k' experts per token), a per-layer budget
(one k' per MoE layer, in depth order), a top-p threshold (each token takes the smallest k whose
router mass reaches p) or the training routing. ``parse_ks`` / ``parse_budgets`` /
``parse_top_ps`` read the command-line lists; ``default_ks`` is 1..2*k_max capped at the expert
count; ``check_settings`` rejects what the routers would refuse. ``EvalError`` is the
evaluation's user error (the command line exits 2 with its message).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence


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
    return list(range(1, min(2 * cfg.k_train, cfg.model.num_moe_experts) + 1))


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
