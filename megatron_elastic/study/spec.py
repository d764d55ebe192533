"""A study spec: which arms to train, from which recipe and data, with which seeds, and how to
evaluate them. Read from YAML (``configs/study/*.yaml``) and checked before anything runs.

Layout of a spec (paths relative to the spec file unless absolute)::

    recipe: model_cpu.yaml            # training recipe every arm starts from
    overrides: [train.lr=3e-3]        # applied to every arm, before the arm's own
    work_dir: ../../runs/study_cpu    # data, checkpoints, logs (large, not committed)
    results_dir: ../../docs/results/elastic_study_cpu   # one small JSON per run (committed)
    seeds: [1, 2]
    data: {max_bytes: null, holdout: {valid: 800000, test: 800000}, corpus_seed: 7, vocab_size: 2000}
    eval: {ks: [1, 2, 3, 4, 5, 6], eval_iters: 16, budget_mean_ks: [1.5, 2.5, 3]}
    protocols:
      scratch: {train_iters: 500, arms: [k2, mmoe_layerwise]}
      continue: {base: k2, base_iters: 500, base_seed: 0, train_iters: 250, arms: [k2, emoe_p2],
                 overrides: [train.lr=1e-3]}
    arms:
      k2: {description: "...", overrides: [elastic.schedule=fixed, model.moe_router_topk=2]}

Every arm x seed of a protocol gets the same recipe, data order (``train.seed`` = the seed) and
token budget (``train_iters``); only the arm's overrides differ. In the ``continue`` protocol
(EMoE's setting) one base run is trained first and every arm starts from its weights
(``checkpoint.finetune``: fresh optimizer and schedule) for ``train_iters`` more steps.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import yaml

PROTOCOLS = ("scratch", "continue")


class StudyError(ValueError):
    """A study spec that cannot run; the message names the key and the fix."""


@dataclass
class Arm:
    name: str
    overrides: List[str]
    description: str = ""


@dataclass
class Protocol:
    name: str
    train_iters: int
    arms: List[str]
    base: Optional[str] = None  # continue: the arm the base model is trained as
    base_iters: Optional[int] = None
    base_seed: Optional[int] = None
    overrides: List[str] = field(default_factory=list)  # this protocol's arms (not its base)


@dataclass
class Run:
    """One arm x seed of one protocol (or the continue protocol's base run)."""

    protocol: str
    arm: Arm
    seed: int
    train_iters: int
    base_of: Optional[str] = None  # set on the continue protocol's base run

    @property
    def key(self) -> str:
        return f"{self.protocol}__{self.arm.name}__seed{self.seed}"


@dataclass
class Study:
    path: Path
    recipe: Path
    overrides: List[str]
    work_dir: Path
    results_dir: Path
    seeds: List[int]
    data: dict
    eval: dict
    protocols: Dict[str, Protocol]
    arms: Dict[str, Arm]
    title: str = ""
    raw: dict = field(default_factory=dict)

    def runs(self, protocols: Optional[List[str]] = None) -> List[Run]:
        """Every run in the order the runner schedules them: base runs first (the continued
        arms wait for them), then the continue protocol (cheaper: every arm), then scratch."""
        chosen = [self.protocols[n] for n in ("continue", "scratch")
                  if n in self.protocols and (not protocols or n in protocols)]
        out: List[Run] = [self.base_run(p) for p in chosen if p.base]
        for p in chosen:
            for arm in p.arms:
                for seed in self.seeds:
                    out.append(Run(p.name, self.arms[arm], seed, p.train_iters))
        return out

    def base_run(self, p: Protocol) -> Run:
        return Run(p.name, Arm(f"base_{p.base}", self.arms[p.base].overrides,
                               f"base model of the continue protocol ({p.base})"),
                   p.base_seed, p.base_iters, base_of=p.base)

    def fingerprint(self, run: Run) -> str:
        """What a run's result depends on; a stored result with another fingerprint is stale."""
        text = json.dumps({"recipe": self.recipe.read_text(), "overrides": self.run_overrides(run),
                           "arm": run.arm.overrides, "seed": run.seed, "iters": run.train_iters,
                           "data": self.data, "eval": self.eval,
                           "base": self.base_fingerprint(run)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def run_overrides(self, run: Run) -> List[str]:
        """Study-wide, then protocol (arms only, not the base), then the arm's own overrides."""
        protocol = [] if run.base_of is not None else self.protocols[run.protocol].overrides
        return list(self.overrides) + list(protocol) + list(run.arm.overrides)

    def base_fingerprint(self, run: Run) -> Optional[str]:
        p = self.protocols[run.protocol]
        if run.base_of is not None or not p.base:
            return None
        return self.fingerprint(self.base_run(p))


def _path(spec_dir: Path, value, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise StudyError(f"{key} must be a path (relative to the spec file), got {value!r}")
    p = Path(value)
    return p if p.is_absolute() else (spec_dir / p).resolve()


def _overrides(value, key: str) -> List[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise StudyError(f"{key} must be a list of section.key=value strings, got {value!r}")
    return list(value)


def load_study(path, work_dir: Optional[str] = None, results_dir: Optional[str] = None) -> Study:
    """Read and check a study spec; ``work_dir`` / ``results_dir`` override the spec's."""
    path = Path(path).resolve()
    if not path.is_file():
        raise StudyError(f"study spec {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: not valid YAML: {exc}") from exc
    known = {"title", "recipe", "overrides", "work_dir", "results_dir", "seeds", "data", "eval",
             "protocols", "arms"}
    unknown = set(raw) - known
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    d = path.parent
    recipe = _path(d, raw.get("recipe"), "recipe")
    if not recipe.is_file():
        raise StudyError(f"{path}: recipe {recipe} does not exist")
    seeds = raw.get("seeds") or []
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise StudyError(f"{path}: seeds must be a non-empty list of integers, e.g. [1, 2]")
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"{path}: seeds {seeds} repeat a value")
    arms: Dict[str, Arm] = {}
    for name, body in (raw.get("arms") or {}).items():
        if not isinstance(body, dict):
            raise StudyError(f"{path}: arm {name} must be a mapping with overrides (and a description)")
        arms[name] = Arm(name, _overrides(body.get("overrides"), f"arms.{name}.overrides"),
                         str(body.get("description", "")))
    protocols: Dict[str, Protocol] = {}
    for name, body in (raw.get("protocols") or {}).items():
        if name not in PROTOCOLS:
            raise StudyError(f"{path}: protocol {name!r} is not one of {', '.join(PROTOCOLS)}")
        body = dict(body or {})
        iters = body.get("train_iters")
        if not isinstance(iters, int) or iters < 1:
            raise StudyError(f"{path}: protocols.{name}.train_iters must be a positive integer")
        listed = body.get("arms") or []
        missing = [a for a in listed if a not in arms]
        if missing or not listed:
            raise StudyError(f"{path}: protocols.{name}.arms must list arms defined under arms:; "
                             f"undefined: {missing or '(none listed)'}")
        p = Protocol(name, iters, list(listed),
                     overrides=_overrides(body.get("overrides"), f"protocols.{name}.overrides"))
        if name == "continue":
            p.base = body.get("base")
            p.base_iters = body.get("base_iters")
            p.base_seed = body.get("base_seed", 0)
            if p.base not in arms:
                raise StudyError(f"{path}: protocols.continue.base must name an arm (the base "
                                 f"model's recipe), got {p.base!r}")
            if not isinstance(p.base_iters, int) or p.base_iters < 1:
                raise StudyError(f"{path}: protocols.continue.base_iters must be a positive integer")
        protocols[name] = p
    if not protocols:
        raise StudyError(f"{path}: protocols is empty: define scratch and/or continue")
    ev = dict(raw.get("eval") or {})
    ev.setdefault("ks", None)
    ev.setdefault("eval_iters", 8)
    ev.setdefault("budget_mean_ks", [])
    ev.setdefault("diagnostics", True)
    return Study(
        path=path,
        recipe=recipe,
        overrides=_overrides(raw.get("overrides"), "overrides"),
        work_dir=Path(work_dir).resolve() if work_dir else _path(d, raw.get("work_dir"), "work_dir"),
        results_dir=(Path(results_dir).resolve() if results_dir
                     else _path(d, raw.get("results_dir"), "results_dir")),
        seeds=list(seeds),
        data=dict(raw.get("data") or {}),
        eval=ev,
        protocols=protocols,
        arms=arms,
        title=str(raw.get("title", path.stem)),
        raw=raw,
    )
