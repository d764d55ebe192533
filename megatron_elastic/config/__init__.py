"""Typed run configuration: YAML recipes, dotted command-line overrides, validation.

A recipe is a YAML file with one mapping per section (``model``, ``parallel``, ``train``, ``data``,
``checkpoint``, ``logging``, ``elastic``); it may name a ``base:`` recipe and hold only what
differs. Keys use Megatron-LM's names for the familiar knobs so a Megatron user reads a recipe
without a glossary. Overrides on the command line are ``section.key=value`` pairs whose values are
parsed as YAML scalars (``train.lr=3e-4``, ``data.data_path=[a,b]``, ``checkpoint.load=null``).

Validation happens in two stages: ``validate()`` checks everything a config can get wrong on its
own; ``validate_world(world_size)`` checks the parallel layout against the number of processes,
which is known only at launch. Every error names the offending key and the fix.

    sections.py     the section dataclasses, ConfigError, the elastic section's derived k values
    run_config.py   Config: construction from mappings, overrides, derived values
    validation.py   every check, with the key and the fix in each message
    recipes.py      YAML recipes on disk: base inheritance, load_config, save_config
"""

from megatron_elastic.config.recipes import load_config, read_recipe, save_config
from megatron_elastic.config.run_config import Config
from megatron_elastic.config.sections import (
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
from megatron_elastic.config.validation import pool_size
from megatron_elastic.moe.schedules import DISTRIBUTIONS, SCHEDULES

__all__ = [
    "SECTIONS", "SCHEDULES", "DISTRIBUTIONS", "Config", "ConfigError", "ModelConfig", "ParallelConfig",
    "TrainConfig", "DataConfig", "CheckpointConfig", "LoggingConfig", "ElasticConfig", "load_config",
    "read_recipe", "save_config", "pool_size",
]
