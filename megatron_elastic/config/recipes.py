"""Recipes on disk: reading a YAML recipe (with ``base:`` inheritance), applying overrides and
validating it (``load_config``), and writing a run's config next to its checkpoints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Union

import yaml

from megatron_elastic.config.run_config import Config
from megatron_elastic.config.sections import ConfigError


def load_config(path: Optional[Union[str, os.PathLike]], overrides: Optional[List[str]] = None) -> Config:
    """Read a YAML recipe, apply ``section.key=value`` overrides, validate."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        raw = read_recipe(path)
        source = str(path)
    cfg = Config.from_dict(raw, source=source)
    if overrides:
        cfg = cfg.apply_overrides(overrides)
    return cfg.validate()


def read_recipe(path: Path, _chain: tuple = ()) -> dict:
    """A recipe's sections, with ``base: other.yaml`` (relative to the recipe's directory)
    resolved: the base is read first and every section of this recipe overrides it key by key,
    so a recipe holds only what differs from its base. Bases may chain; cycles are refused."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a recipe file name, e.g. base: smoke.yaml")
    base_path = (path.parent / base).resolve()
    chain = _chain + (path.resolve(),)
    if base_path in chain:
        raise ConfigError(f"{path}: base recipes form a cycle: {' -> '.join(p.name for p in chain + (base_path,))}")
    if not base_path.is_file():
        raise ConfigError(f"{path}: base recipe {base} not found at {base_path} (paths are relative to "
                          "the recipe's directory)")
    merged = read_recipe(base_path, chain)
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def save_config(cfg: Config, path: Union[str, os.PathLike]) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
