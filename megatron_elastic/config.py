"""Typed run configuration: YAML recipes, dotted command-line overrides, validation.

A recipe is a YAML file with one mapping per section (``model``, ``parallel``, ``train``, ``data``,
``checkpoint``, ``logging``, ``elastic``). Keys use Megatron-LM's names for the familiar knobs so a
Megatron user reads a recipe without a glossary. Overrides on the command line are
``section.key=value`` pairs whose values are parsed as YAML scalars (``train.lr=3e-4``,
``data.data_path=[a,b]``, ``checkpoint.load=null``).

Validation happens in two stages: ``validate()`` checks everything a config can get wrong on its
own; ``validate_world(world_size)`` checks the parallel layout against the number of processes,
which is known only at launch. Every error names the offending key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the key and the fix."""


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: Optional[int] = None  # default hidden_size // num_attention_heads
    ffn_hidden_size: Optional[int] = None  # dense MLP width; unused while every layer is MoE
    seq_length: int = 128
    max_position_embeddings: Optional[int] = None  # default seq_length
    vocab_size: Optional[int] = None  # default: the tokenizer's, padded
    make_vocab_size_divisible_by: int = 64
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    qk_layernorm: bool = False
    rotary_base: float = 10000.0
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    untie_embeddings_and_output_weights: bool = True
    # Mixture of experts (Megatron names).
    num_moe_experts: int = 8
    moe_ffn_hidden_size: int = 128
    moe_router_topk: int = 2
    moe_router_score_function: str = "softmax"
    # False = Mixtral: top-k over logits then softmax over the selected = renormalised top-k probs.
    moe_router_pre_softmax: bool = False
    moe_router_load_balancing_type: str = "aux_loss"
    moe_aux_loss_coeff: float = 1e-2
    moe_z_loss_coeff: Optional[float] = None
    moe_token_dispatcher_type: str = "alltoall"
    moe_grouped_gemm: bool = False
    moe_expert_capacity_factor: Optional[float] = None
    moe_pad_expert_input_to_capacity: bool = False
    moe_router_dtype: Optional[str] = "fp32"
    moe_per_layer_logging: bool = True


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    # Default: tensor_model_parallel_size, as in Megatron-LM.
    expert_tensor_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    distributed_backend: Optional[str] = None  # default: nccl with CUDA, gloo without
    distributed_timeout_minutes: int = 10


@dataclass
class TrainConfig:
    micro_batch_size: int = 2
    global_batch_size: int = 8
    train_iters: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None  # default train_iters
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    bf16: Optional[bool] = None  # default: bf16 on GPU, fp32 on CPU
    use_distributed_optimizer: Optional[bool] = None  # default: on GPU only
    eval_interval: int = 50
    eval_iters: int = 10
    exit_signal_handler: bool = True


@dataclass
class DataConfig:
    # Megatron blend syntax: [prefix] or [weight, prefix, weight, prefix, ...].
    data_path: List[Any] = field(default_factory=list)
    split: str = "949,50,1"
    tokenizer_model: Optional[str] = None
    num_workers: int = 0
    cache_path: Optional[str] = None
    mmap_bin_files: bool = True


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    finetune: bool = False  # load weights only: fresh optimizer, scheduler and iteration
    async_save: bool = False


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None
    # offline unless WANDB_API_KEY is set (or "online"/"disabled" is forced here)
    wandb_mode: Optional[str] = None


@dataclass
class ElasticConfig:
    """How many experts each token uses, per layer and step (M-MoE), and from what pool (EMoE)."""

    schedule: str = "fixed"  # fixed | batch | microbatch | layerwise | top_p
    k_min: Optional[int] = None  # default moe_router_topk
    k_max: Optional[int] = None  # default moe_router_topk
    distribution: str = "uniform"  # uniform | weighted (P(k) ~ exp(log(k)/tau))
    tau: float = 1.0
    top_p: Optional[float] = None
    pool_ratio: Optional[float] = None  # EMoE candidate pool: k_ideal = ceil(pool_ratio * k)
    router_loss_coeff: float = 0.0  # hierarchical router loss lambda
    seed: Optional[int] = None  # default train.seed
    eval_k: Optional[Any] = None  # inference k: int, per-layer list, or null for the training k


SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "elastic": ElasticConfig,
}

SCHEDULES = ("fixed", "batch", "microbatch", "layerwise", "top_p")
DISTRIBUTIONS = ("uniform", "weighted")


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

    @property
    def elastic_seed(self) -> int:
        return self.elastic.seed if self.elastic.seed is not None else self.train.seed

    # ------------------------------------------------------------------ validation
    def validate(self) -> "Config":
        m, p, t, e = self.model, self.parallel, self.train, self.elastic
        if p.expert_tensor_parallel_size is None:
            p.expert_tensor_parallel_size = p.tensor_model_parallel_size
        _positive(self, ["model.num_layers", "model.hidden_size", "model.num_attention_heads",
                         "model.num_query_groups", "model.seq_length", "model.num_moe_experts",
                         "model.moe_ffn_hidden_size", "model.moe_router_topk",
                         "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
                         "parallel.expert_model_parallel_size", "parallel.expert_tensor_parallel_size",
                         "parallel.context_parallel_size", "train.micro_batch_size",
                         "train.global_batch_size", "train.train_iters", "logging.log_interval"])
        if m.num_attention_heads % m.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                f"model.num_query_groups={m.num_query_groups}: choose query groups that divide the heads"
            )
        if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
                f"{m.num_attention_heads}: change one, or set model.kv_channels explicitly"
            )
        tp = p.tensor_model_parallel_size
        for key, value in (("num_attention_heads", m.num_attention_heads),
                           ("num_query_groups", m.num_query_groups)):
            if value % tp:
                raise ConfigError(
                    f"model.{key}={value} is not divisible by parallel.tensor_model_parallel_size={tp}"
                )
        if m.num_moe_experts % p.expert_model_parallel_size:
            raise ConfigError(
                f"model.num_moe_experts={m.num_moe_experts} is not divisible by "
                f"parallel.expert_model_parallel_size={p.expert_model_parallel_size}: every expert "
                "parallel rank must hold the same number of experts"
            )
        if m.moe_router_topk > m.num_moe_experts:
            raise ConfigError(
                f"model.moe_router_topk={m.moe_router_topk} exceeds model.num_moe_experts={m.num_moe_experts}"
            )
        if p.pipeline_model_parallel_size != 1:
            raise ConfigError(
                "parallel.pipeline_model_parallel_size must be 1: pipeline parallelism is not "
                "supported by this trainer yet; use tensor/expert/data parallelism"
            )
        if p.context_parallel_size != 1:
            raise ConfigError("parallel.context_parallel_size must be 1 (not supported yet)")
        if tp > 1 and not p.sequence_parallel:
            raise ConfigError(
                "parallel.tensor_model_parallel_size > 1 with MoE layers requires "
                "parallel.sequence_parallel=true (Megatron-core refuses MoE training under TP "
                "without it)"
            )
        if p.expert_tensor_parallel_size < tp and p.expert_model_parallel_size == 1:
            # Megatron marks expert weights for the expert-data-parallel reduction only when
            # EP > 1; with EP = 1 they are reduced over the data-parallel group alone, so the
            # partial gradients that each tensor-parallel rank's sequence slice produces would
            # never be summed over TP and the replicas would drift apart.
            raise ConfigError(
                f"parallel.expert_tensor_parallel_size={p.expert_tensor_parallel_size} < "
                f"parallel.tensor_model_parallel_size={tp} needs parallel.expert_model_parallel_size"
                f" > 1: set expert_tensor_parallel_size={tp} (the default) or use expert parallelism"
            )
        if t.global_batch_size % t.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"train.micro_batch_size={t.micro_batch_size}"
            )
        if m.moe_token_dispatcher_type not in ("alltoall", "allgather"):
            raise ConfigError(
                f"model.moe_token_dispatcher_type={m.moe_token_dispatcher_type!r}: use 'alltoall' "
                "(elastic k) or 'allgather'"
            )
        if m.moe_router_score_function not in ("softmax", "sigmoid"):
            raise ConfigError("model.moe_router_score_function must be 'softmax' or 'sigmoid'")
        if t.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError("train.lr_decay_style must be one of cosine, linear, constant")
        self._validate_elastic()
        return self

    def _validate_elastic(self) -> None:
        e, m = self.elastic, self.model
        n = m.num_moe_experts
        if e.schedule not in SCHEDULES:
            raise ConfigError(f"elastic.schedule={e.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if e.distribution not in DISTRIBUTIONS:
            raise ConfigError(
                f"elastic.distribution={e.distribution!r} is not one of {', '.join(DISTRIBUTIONS)}"
            )
        k_min, k_max = self.elastic_k_min, self.elastic_k_max
        if not 1 <= k_min <= n or not 1 <= k_max <= n:
            raise ConfigError(
                f"elastic k range [{k_min}, {k_max}] must lie within [1, model.num_moe_experts={n}]"
            )
        if k_min > k_max:
            raise ConfigError(f"elastic.k_min={k_min} is larger than elastic.k_max={k_max}")
        if e.schedule == "fixed" and k_min != k_max:
            raise ConfigError(
                "elastic.schedule=fixed trains one k: set k_min == k_max (or leave both unset to use "
                "model.moe_router_topk), or pick a varying schedule such as layerwise"
            )
        if e.tau <= 0:
            raise ConfigError(f"elastic.tau={e.tau} must be positive")
        if e.schedule == "top_p":
            if e.top_p is None or not 0 < e.top_p <= 1:
                raise ConfigError("elastic.schedule=top_p needs elastic.top_p in (0, 1]")
        if e.pool_ratio is not None:
            if e.pool_ratio < 1:
                raise ConfigError(f"elastic.pool_ratio={e.pool_ratio} must be >= 1")
            pool = pool_size(k_max, e.pool_ratio)
            if pool > n:
                raise ConfigError(
                    f"elastic candidate pool k_ideal=ceil(pool_ratio*k_max)={pool} exceeds "
                    f"model.num_moe_experts={n}: lower elastic.pool_ratio or elastic.k_max"
                )
        if e.router_loss_coeff < 0:
            raise ConfigError("elastic.router_loss_coeff must be >= 0")
        if e.eval_k is not None:
            ks = e.eval_k if isinstance(e.eval_k, list) else [e.eval_k]
            if isinstance(e.eval_k, list) and len(ks) != m.num_layers:
                raise ConfigError(
                    f"elastic.eval_k lists {len(ks)} values but the model has {m.num_layers} layers"
                )
            for k in ks:
                if not isinstance(k, int) or not 1 <= k <= n:
                    raise ConfigError(f"elastic.eval_k value {k!r} must be an int in [1, {n}]")

    def validate_world(self, world_size: int) -> int:
        """Check the parallel layout against the process count; return the data-parallel size."""
        p, t = self.parallel, self.train
        model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor x pipeline x context parallel "
                f"size = {model_parallel}: launch a multiple of {model_parallel} processes"
            )
        expert_parallel = (
            p.expert_model_parallel_size * p.expert_tensor_parallel_size * p.pipeline_model_parallel_size
        )
        if world_size % expert_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by expert x expert-tensor x pipeline "
                f"parallel size = {expert_parallel}: launch a multiple of {expert_parallel} processes"
            )
        dp = world_size // model_parallel
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"train.micro_batch_size={t.micro_batch_size} x data parallel size={dp}: pick a "
                f"global batch that is a multiple of {t.micro_batch_size * dp}"
            )
        return dp


def pool_size(k: int, pool_ratio: float) -> int:
    """k_ideal before clipping to the expert count (the router uses candidate_pool_size)."""
    import math

    return max(k, math.ceil(pool_ratio * k - 1e-9))


def load_config(path: Optional[Union[str, os.PathLike]], overrides: Optional[List[str]] = None) -> Config:
    """Read a YAML recipe, apply ``section.key=value`` overrides, validate."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        source = str(path)
    cfg = Config.from_dict(raw, source=source)
    if overrides:
        cfg = cfg.apply_overrides(overrides)
    return cfg.validate()


def save_config(cfg: Config, path: Union[str, os.PathLike]) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------- helpers
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


def _positive(cfg: Config, keys):
    for dotted in keys:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is None or value < 1:
            raise ConfigError(f"{dotted}={value} must be a positive integer")
