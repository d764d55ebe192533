"""``Config``: the run configuration as one object of typed sections, built from a mapping (a
recipe or a saved run config) with unknown keys refused and values coerced to their types, plus
dotted command-line overrides and the derived values read across the package.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, List, Union, get_args, get_origin, get_type_hints

import yaml

from megatron_elastic.config.sections import (
    RETIRED_CHECKPOINT_KEYS,
    SECTIONS,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    ElasticConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "Config":
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(raw).__name__}")
        _reject_unknown(raw.keys(), SECTIONS.keys(), source, "section")
        raw = _drop_retired_checkpoint_keys(raw, source)
        kwargs = {}
        for name, section_cls in SECTIONS.items():
            values = raw.get(name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section '{name}' must be a mapping")
            known = [f.name for f in dataclasses.fields(section_cls)]
            _reject_unknown(values.keys(), known, source, f"key in section '{name}'", prefix=f"{name}.")
            hints = get_type_hints(section_cls)
            kwargs[name] = section_cls(
                **{k: _coerce(v, hints[k], f"{name}.{k}", source) for k, v in values.items()}
            )
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def apply_overrides(self, overrides: List[str]) -> "Config":
        raw = self.to_dict()
        for item in overrides:
            if "=" not in item:
                raise ConfigError(
                    f"override '{item}' is not of the form section.key=value (e.g. train.lr=3e-4)"
                )
            dotted, value = item.split("=", 1)
            parts = dotted.strip().split(".")
            if len(parts) != 2:
                raise ConfigError(
                    f"override '{item}': the key must be section.key (e.g. model.num_layers=4)"
                )
            section, key = parts
            _reject_unknown([section], SECTIONS.keys(), "command line", "section")
            raw[section][key] = yaml.safe_load(value) if value != "" else None
        return Config.from_dict(raw, source="command line")

    # ------------------------------------------------------------------ derived values
    @property
    def elastic_k_min(self) -> int:
        e = self.elastic
        return e.k_min if e.k_min is not None else self.model.moe_router_topk

    @property
    def elastic_k_max(self) -> int:
        e = self.elastic
        return e.k_max if e.k_max is not None else self.model.moe_router_topk

    # One rule for every k derived from the recipe; the model, the evaluation and the Hugging
    # Face export all read these (a fixed schedule validates k_min == k_max).
    @property
    def k_train(self) -> int:
        return self.elastic.k_train if self.elastic.k_max is not None else self.model.moe_router_topk

    @property
    def default_eval_k(self) -> int:
        e = self.elastic.eval_k
        return e if isinstance(e, int) else self.k_train

    @property
    def buffer_k(self) -> int:
        """Megatron's moe_router_topk: the largest k any training step can route with (Megatron
        sizes static buffers and capacities from it)."""
        return max(self.model.moe_router_topk, self.elastic_k_max)

    @property
    def elastic_seed(self) -> int:
        return self.elastic.seed if self.elastic.seed is not None else self.train.seed

    # ------------------------------------------------------------------ validation

    # ------------------------------------------------------------------ validation
    def validate(self) -> "Config":
        from megatron_elastic.config.validation import validate

        validate(self)
        return self

    def validate_world(self, world_size: int) -> int:
        """Check the parallel layout against the process count; return the data-parallel size."""
        from megatron_elastic.config.validation import validate_world

        return validate_world(self, world_size)



# ---------------------------------------------------------------------- helpers
def _drop_retired_checkpoint_keys(raw: dict, source: str) -> dict:
    """Accept a retired checkpoint key at its inert value (configs saved in older checkpoints
    carry ``async_save: false``), refuse any other value with the reason."""
    section = raw.get("checkpoint")
    if not isinstance(section, dict) or not any(k in section for k in RETIRED_CHECKPOINT_KEYS):
        return raw
    section = dict(section)
    for key, (inert, message) in RETIRED_CHECKPOINT_KEYS.items():
        if key in section:
            value = section.pop(key)
            if value is not None and value != inert:
                raise ConfigError(f"{source}: {message}")
    return {**raw, "checkpoint": section}


def _reject_unknown(keys, known, source, what, prefix=""):
    known = list(known)
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known: {', '.join(known)}"
            raise ConfigError(f"{source}: unknown {what} '{prefix}{key}'{hint}")


def _coerce(value, hint, key, source):
    """Check a YAML value against the dataclass annotation (ints widen to floats)."""
    if value is None:
        return None
    origin = get_origin(hint)
    args = [a for a in get_args(hint) if a is not type(None)]
    if origin is Union:
        if len(args) == 1:
            return _coerce(value, args[0], key, source)
        return value  # Any-like unions (eval_k): validated semantically later
    if hint is Any:
        return value
    if origin in (list, List):
        if not isinstance(value, list):
            value = [value]
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
    if hint is str:
        return str(value)
    return value
