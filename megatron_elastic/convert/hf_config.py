"""Model configuration across the two formats: Megatron run config <-> Hugging Face config.json.

Export (Megatron -> HF): ``choose_architecture`` picks the architecture that expresses the model
(OLMoE for projection-wide QK-norm, Qwen2-MoE for a shared expert, Qwen3-MoE for per-head QK-norm,
else Mixtral) and refuses, by name, every feature the chosen one cannot express exactly (see
``_refusals``); ``model_shape`` gives the tensor shapes;
``hf_config`` builds the transformers config object, with the elastic schedule under
``elastic_moe`` (``elastic_metadata``).

Import (HF -> Megatron): ``read_hf_config`` / ``as_hf_config`` read config.json through the real
transformers class; ``hf_shape`` gives the tensor shapes; ``check_supported`` rejects features the
Megatron model here cannot reproduce; ``megatron_config_from_hf`` builds the recipe, restoring the
elastic section an export recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import torch

from megatron_elastic.config import Config, ConfigError
from megatron_elastic.convert import ConversionError, UnknownArchitectureError
from megatron_elastic.convert import mapping
from megatron_elastic.convert.mapping import ModelShape

ELASTIC_FORMAT_VERSION = 1


# ------------------------------------------------------------------------------ export: architecture
def choose_architecture(cfg: Config, requested: Optional[str] = None) -> str:
    """The architecture to export to (``requested``, or the one the model's features imply);
    ConversionError listing every feature it cannot express exactly."""
    m = cfg.model
    if requested in (None, "auto"):
        if m.qk_layernorm and m.qk_norm_scope == "projection":
            arch = "olmoe"
        elif m.moe_shared_expert_intermediate_size is not None:
            arch = "qwen2_moe"
        elif m.qk_layernorm:
            arch = "qwen3_moe"
        else:
            arch = "mixtral"
    elif requested in mapping.ARCHITECTURES:
        arch = requested
    elif requested in mapping.HF_CLASS_TO_ARCH:
        arch = mapping.HF_CLASS_TO_ARCH[requested]
    else:
        raise UnknownArchitectureError(
            f"unknown architecture {requested!r}; choose auto, {', '.join(mapping.ARCHITECTURES)}"
        )
    if m.multi_latent_attention:
        raise ConversionError("the model has multi-latent attention: export it as deepseek_v3 "
                              "(convert_megatron_to_hf chooses it by itself)")
    problems = _refusals(cfg, arch)
    if problems:
        raise ConversionError(
            f"cannot export this model as {mapping.ARCHITECTURES[arch]}: " + "; ".join(problems)
        )
    return arch


_QK_NORM_ARCH = {"head": "qwen3_moe", "projection": "olmoe"}


def _refusals(cfg: Config, arch: str) -> List[str]:
    """Every feature of the model that ``arch`` cannot express (each would change the outputs)."""
    m = cfg.model
    name = mapping.ARCHITECTURES[arch]
    out = []
    if m.normalization != "RMSNorm":
        out.append(f"model.normalization={m.normalization}: {name} uses RMSNorm")
    if m.moe_router_score_function != "softmax":
        out.append(f"model.moe_router_score_function={m.moe_router_score_function}: {name} routes "
                   "with a softmax; a sigmoid router has no equivalent there")
    wants_qk = {"mixtral": None, "qwen2_moe": None, "qwen3_moe": "head", "olmoe": "projection"}[arch]
    has_qk = m.qk_norm_scope if m.qk_layernorm else None
    if has_qk != wants_qk:
        if has_qk is None:
            out.append(f"{name} always normalises queries and keys ({wants_qk} scope) but this model has "
                       "no QK-norm: export it as mixtral, or qwen2_moe with a shared expert")
        else:
            out.append(f"the model has QK-norm over each {has_qk} (model.qk_layernorm=true, "
                       f"model.qk_norm_scope={m.qk_norm_scope}) which {name} "
                       + ("does not have" if wants_qk is None else f"applies per {wants_qk}")
                       + f": export it as {_QK_NORM_ARCH[has_qk]}")
    shared = m.moe_shared_expert_intermediate_size
    if arch == "qwen2_moe":
        if shared is None:
            out.append("Qwen2-MoE always has a gated shared expert but this model has none "
                       "(model.moe_shared_expert_intermediate_size=null): export it as mixtral")
        elif not m.moe_shared_expert_gate:
            out.append("model.moe_shared_expert_gate=false: Qwen2-MoE always scales its shared expert "
                       "by a sigmoid gate")
    elif shared is not None:
        out.append(f"model.moe_shared_expert_intermediate_size={shared}: {name} has no shared "
                   "expert (qwen2_moe has one)")
    if m.add_qkv_bias and arch != "qwen2_moe":
        out.append(f"model.add_qkv_bias=true: {name} has no q/k/v biases (qwen2_moe has them)")
    if not all(m.moe_layer_pattern) and arch not in ("qwen2_moe", "qwen3_moe"):
        out.append(f"model.moe_layer_freq={m.moe_layer_freq!r} has dense layers: {name} makes every "
                   "layer MoE (qwen2_moe and qwen3_moe have mlp_only_layers)")
    if arch == "mixtral" and m.moe_router_pre_softmax:
        out.append(
            "model.moe_router_pre_softmax=true: the gate weights are the raw softmax probabilities of "
            "the selected experts (their sum grows with k), but Mixtral always renormalises the "
            "top-k probabilities to sum to 1, so the exported model would compute something else. "
            "Qwen3-MoE, Qwen2-MoE and OLMoE (norm_topk_prob=false) express this router"
        )
    if arch == "olmoe":
        head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
        if head_dim * m.num_attention_heads != m.hidden_size:
            out.append(f"model.kv_channels={m.kv_channels}: OLMoE's head dim is always "
                       f"hidden_size / num_attention_heads = {m.hidden_size // m.num_attention_heads}")
    return out


def model_shape(cfg: Config, vocab_size: int, arch: str) -> ModelShape:
    m = cfg.model
    dense = tuple(i for i, v in enumerate(m.moe_layer_pattern) if not v)
    return ModelShape(
        architecture=arch,
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads,
        num_experts=m.num_moe_experts,
        ffn_hidden_size=m.moe_ffn_hidden_size,
        vocab_size=vocab_size,
        qk_layernorm=m.qk_layernorm,
        tied_embeddings=not m.untie_embeddings_and_output_weights,
        dense_layers=dense,
        dense_ffn_hidden_size=(m.ffn_hidden_size or 0) if dense else 0,
        shared_expert_size=m.moe_shared_expert_intermediate_size or 0,
        shared_expert_gate=m.moe_shared_expert_gate,
        qkv_bias=m.add_qkv_bias,
        qk_norm_scope=m.qk_norm_scope,
    )


def default_inference_k(cfg: Config) -> int:
    """The k Megatron evaluates with when nothing is set (moe/layer.py attach_elastic)."""
    return cfg.default_eval_k


def elastic_metadata(cfg: Config, iteration: Optional[int]) -> dict:
    """What config.json keeps under ``elastic_moe``: the training schedule and k range, and the
    per-layer inference k when the recipe set one (``hf_elastic.load_elastic_hf`` applies it)."""
    e = cfg.elastic
    return {
        "format_version": ELASTIC_FORMAT_VERSION,
        "k_train": cfg.k_train,
        "schedule": e.schedule,
        "k_min": cfg.elastic_k_min,
        "k_max": cfg.elastic_k_max,
        "distribution": e.distribution,
        "tau": e.tau,
        "top_p": e.top_p,
        "pool_ratio": e.pool_ratio,
        "router_loss_coeff": e.router_loss_coeff,
        "seed": cfg.elastic_seed,
        "inference_k": list(e.eval_k) if isinstance(e.eval_k, list) else None,
        "default_inference_k": default_inference_k(cfg),
        "moe_router_pre_softmax": cfg.model.moe_router_pre_softmax,
        "iteration": iteration,
    }


def hf_config(cfg: Config, shape: ModelShape, dtype: torch.dtype, special: Optional[dict],
              iteration: Optional[int]):
    """The transformers config object (written with save_pretrained, so its format is exact)."""
    m = cfg.model
    special = special or {}
    common = dict(
        vocab_size=shape.vocab_size,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups,
        head_dim=shape.head_dim,
        hidden_act="silu",
        max_position_embeddings=m.max_position_embeddings or m.seq_length,
        initializer_range=m.init_method_std,
        rms_norm_eps=m.norm_epsilon,
        use_cache=True,
        tie_word_embeddings=shape.tied_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
        attention_dropout=0.0,
        num_experts_per_tok=default_inference_k(cfg),
        output_router_logits=False,
        router_aux_loss_coef=m.moe_aux_loss_coeff,
        bos_token_id=special.get("bos"),
        eos_token_id=special.get("eos"),
        pad_token_id=special.get("pad"),
        dtype=str(dtype).replace("torch.", ""),
        elastic_moe=elastic_metadata(cfg, iteration),
    )
    # Qwen2/3-MoE and OLMoE renormalise the top-k probabilities iff norm_topk_prob; Megatron does
    # iff not moe_router_pre_softmax (softmax over the selected logits == renormalised top-k).
    norm_topk_prob = not m.moe_router_pre_softmax
    if shape.architecture == "mixtral":
        from transformers import MixtralConfig

        config = MixtralConfig(
            intermediate_size=m.moe_ffn_hidden_size,
            num_local_experts=m.num_moe_experts,
            sliding_window=None,
            router_jitter_noise=0.0,
            **common,
        )
    elif shape.architecture == "olmoe":
        from transformers import OlmoeConfig

        config = OlmoeConfig(
            intermediate_size=m.moe_ffn_hidden_size,
            num_experts=m.num_moe_experts,
            norm_topk_prob=norm_topk_prob,
            attention_bias=False,
            clip_qkv=None,
            **common,
        )
    else:
        from transformers import Qwen2MoeConfig, Qwen3MoeConfig

        qwen = dict(
            # The dense MLP width (Megatron ffn_hidden_size) of the mlp_only_layers.
            intermediate_size=m.ffn_hidden_size or m.moe_ffn_hidden_size,
            moe_intermediate_size=m.moe_ffn_hidden_size,
            num_experts=m.num_moe_experts,
            norm_topk_prob=norm_topk_prob,
            # Megatron's MoE pattern, written out: HF's decoder_sparse_step counts from a different
            # layer (MoE iff (i + 1) % step == 0), the explicit list needs no translation.
            decoder_sparse_step=1,
            mlp_only_layers=list(shape.dense_layers),
            use_sliding_window=False,
        )
        if shape.architecture == "qwen2_moe":
            config = Qwen2MoeConfig(
                shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
                qkv_bias=m.add_qkv_bias,
                **qwen,
                **common,
            )
        else:
            config = Qwen3MoeConfig(attention_bias=False, **qwen, **common)
    config.architectures = [mapping.ARCHITECTURES[shape.architecture]]
    return config


# ------------------------------------------------------------------------------ import: config.json
def read_hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise ConversionError(f"{hf_dir} is not a directory")
    if not path.is_file():
        raise ConversionError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from exc


def as_hf_config(hf, arch: str):
    """A transformers config object from a config.json dict (or pass one through).

    Going through the real config class applies transformers' own defaults and aliases (e.g.
    Qwen3MoeConfig writes its expert count as ``num_local_experts``; old configs carry
    ``rope_theta`` instead of ``rope_parameters``), so every read below is by canonical attribute.
    """
    if not isinstance(hf, dict):
        return hf
    from transformers import AutoConfig

    raw = dict(hf)
    raw.pop("model_type", None)
    raw.pop("transformers_version", None)
    return AutoConfig.for_model(arch, **raw)


def _rope_theta(c, source: str) -> float:
    rope = dict(getattr(c, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConversionError(
            f"{source}: RoPE scaling ({rope_type}) is not supported by the Megatron model here "
            "(plain RoPE only)"
        )
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    return float(theta)


def hf_moe_pattern(c, arch: str) -> List[int]:
    """1 per MoE layer, 0 per dense one, as the transformers decoder layer decides it (Qwen2/3-MoE:
    dense iff listed in mlp_only_layers or (i + 1) % decoder_sparse_step != 0)."""
    n = c.num_hidden_layers
    if arch not in ("qwen2_moe", "qwen3_moe"):
        return [1] * n
    dense = set(getattr(c, "mlp_only_layers", None) or [])
    step = int(getattr(c, "decoder_sparse_step", 1) or 1)
    return [int(i not in dense and c.num_experts > 0 and (i + 1) % step == 0) for i in range(n)]


def hf_shape(hf, arch: str) -> ModelShape:
    c = as_hf_config(hf, arch)
    heads = c.num_attention_heads
    pattern = hf_moe_pattern(c, arch)
    dense = tuple(i for i, v in enumerate(pattern) if not v)
    qwen = arch in ("qwen2_moe", "qwen3_moe")
    return ModelShape(
        architecture=arch,
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        num_heads=heads,
        num_query_groups=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        num_experts=c.num_local_experts if arch == "mixtral" else c.num_experts,
        ffn_hidden_size=c.moe_intermediate_size if qwen else c.intermediate_size,
        vocab_size=c.vocab_size,
        qk_layernorm=arch in ("qwen3_moe", "olmoe"),
        tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        dense_layers=dense,
        dense_ffn_hidden_size=int(c.intermediate_size) if dense else 0,
        shared_expert_size=int(c.shared_expert_intermediate_size) if arch == "qwen2_moe" else 0,
        shared_expert_gate=arch == "qwen2_moe",
        qkv_bias=arch == "qwen2_moe" and bool(c.qkv_bias),
        qk_norm_scope="projection" if arch == "olmoe" else "head",
    )


def check_supported(hf, arch: str, source: str) -> None:
    """Reject features the Megatron model here cannot reproduce (each would change outputs)."""
    c = as_hf_config(hf, arch)
    problems = []
    act = getattr(c, "hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act={act} (SwiGLU experts use silu)")
    if getattr(c, "sliding_window", None) and (arch == "mixtral" or getattr(c, "use_sliding_window", False)):
        problems.append(f"sliding_window={c.sliding_window} (no sliding-window attention)")
    elif getattr(c, "use_sliding_window", False):
        problems.append("use_sliding_window=true (no sliding-window attention)")
    elif any(t != "full_attention" for t in getattr(c, "layer_types", None) or []):
        problems.append(f"layer_types={c.layer_types} (full attention in every layer only)")
    if arch in ("qwen3_moe", "olmoe") and getattr(c, "attention_bias", False):
        problems.append("attention_bias=true (the Megatron model has q/k/v biases only with Qwen2-MoE's "
                        "qkv_bias; no output-projection or Qwen3/OLMoE attention biases)")
    if arch == "olmoe":
        if getattr(c, "clip_qkv", None) is not None:
            problems.append(f"clip_qkv={c.clip_qkv} (the Megatron attention does not clamp q/k/v)")
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        if head_dim * c.num_attention_heads != c.hidden_size:
            problems.append(f"head_dim={head_dim} x {c.num_attention_heads} heads != hidden_size="
                            f"{c.hidden_size} (OLMoE's q_norm spans hidden_size)")
    if arch in ("qwen2_moe", "qwen3_moe"):
        if c.num_experts < 1 or not any(hf_moe_pattern(c, arch)):
            problems.append(f"num_experts={c.num_experts}, mlp_only_layers={c.mlp_only_layers}, "
                            f"decoder_sparse_step={c.decoder_sparse_step} leave no MoE layer (a dense "
                            "model has no k to make elastic)")
    if arch == "qwen2_moe" and not getattr(c, "shared_expert_intermediate_size", 0):
        problems.append("shared_expert_intermediate_size=0 (Megatron's shared expert needs a width; "
                        "an empty one is not mapped)")
    if problems:
        raise ConversionError(f"{source}: unsupported: " + "; ".join(problems))


def elastic_section(meta: dict, k_cfg: int, k_train: int) -> dict:
    """The recipe's elastic section from config.json's ``elastic_moe`` (``meta``, may be empty)
    and ``num_experts_per_tok`` (``k_cfg``)."""
    schedule = meta.get("schedule", "fixed")
    elastic = {"schedule": schedule}
    for key in ("k_min", "k_max", "distribution", "tau", "top_p", "pool_ratio", "router_loss_coeff", "seed"):
        if meta.get(key) is not None:
            elastic[key] = meta[key]
    default_k = k_train if schedule == "fixed" else int(meta.get("k_max") or k_train)
    if meta.get("inference_k"):
        elastic["eval_k"] = [int(k) for k in meta["inference_k"]]
    elif k_cfg != default_k:
        elastic["eval_k"] = k_cfg  # num_experts_per_tok was changed after export: keep that choice
    return elastic


def megatron_config_from_hf(
    hf,
    arch: str,
    output: Optional[Path] = None,
    tensor_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    tokenizer_model: Optional[Path] = None,
    source: str = "config.json",
) -> Config:
    """The Megatron recipe matching an HF config (dict or config object), with the chosen
    parallel layout.

    The elastic section comes back from ``elastic_moe`` when the model was exported from here
    (schedule, k range, per-layer inference k); otherwise it is a fixed schedule at
    ``num_experts_per_tok``. Any elastic recipe can then be applied as overrides: the weights do
    not depend on it.
    """
    hf = as_hf_config(hf, arch)
    check_supported(hf, arch, source)
    shape = hf_shape(hf, arch)
    meta = dict(getattr(hf, "elastic_moe", None) or {})
    k_cfg = int(hf.num_experts_per_tok)
    k_train = int(meta.get("k_train", k_cfg))
    if arch == "mixtral":
        pre_softmax = False  # Mixtral always renormalises the top-k probabilities
    else:
        pre_softmax = not bool(hf.norm_topk_prob)
    if "moe_router_pre_softmax" in meta and bool(meta["moe_router_pre_softmax"]) != pre_softmax:
        raise ConversionError(
            f"{source}: elastic_moe.moe_router_pre_softmax={meta['moe_router_pre_softmax']} contradicts "
            f"{'the Mixtral router' if arch == 'mixtral' else 'norm_topk_prob'}; the config was edited inconsistently"
        )
    elastic = elastic_section(meta, k_cfg, k_train)
    max_pos = int(getattr(hf, "max_position_embeddings", None) or 4096)
    tp, ep = tensor_model_parallel_size, expert_model_parallel_size
    raw = {
        "model": {
            "num_layers": shape.num_layers,
            "hidden_size": shape.hidden_size,
            "num_attention_heads": shape.num_heads,
            "num_query_groups": shape.num_query_groups,
            "kv_channels": shape.head_dim,
            "seq_length": min(max_pos, 4096),
            "max_position_embeddings": max_pos,
            # The HF vocabulary as is (no further padding), so a round trip keeps every shape.
            "vocab_size": shape.vocab_size,
            "normalization": "RMSNorm",
            "norm_epsilon": float(hf.rms_norm_eps),
            "qk_layernorm": shape.qk_layernorm,
            "qk_norm_scope": shape.qk_norm_scope,
            "add_qkv_bias": shape.qkv_bias,
            "rotary_base": _rope_theta(hf, source),
            "init_method_std": float(getattr(hf, "initializer_range", 0.02)),
            "untie_embeddings_and_output_weights": not shape.tied_embeddings,
            "num_moe_experts": shape.num_experts,
            "moe_ffn_hidden_size": shape.ffn_hidden_size,
            # Qwen2/3-MoE's dense-MLP width: the mlp_only_layers' (kept for the round trip when
            # every layer is MoE).
            "ffn_hidden_size": int(hf.intermediate_size) if arch in ("qwen2_moe", "qwen3_moe") else None,
            "moe_layer_freq": 1 if not shape.dense_layers else [int(shape.is_moe(i)) for i in range(shape.num_layers)],
            "moe_shared_expert_intermediate_size": shape.shared_expert_size or None,
            "moe_shared_expert_gate": shape.shared_expert_gate,
            "moe_router_topk": k_train,
            "moe_router_pre_softmax": pre_softmax,
            "moe_aux_loss_coeff": float(getattr(hf, "router_aux_loss_coef", 0.01)),
        },
        "parallel": {
            "tensor_model_parallel_size": tp,
            "expert_model_parallel_size": ep,
            "sequence_parallel": tp > 1,
        },
        "data": {"tokenizer_model": str(tokenizer_model) if tokenizer_model else None},
        # Weights only: the import has no optimizer state, so training starts a fresh optimizer
        # and schedule at iteration 0 from these weights.
        "checkpoint": {"load": str(output) if output else None, "finetune": True},
        "elastic": elastic,
    }
    try:
        cfg = Config.from_dict(raw, source=source).validate()
    except ConfigError as exc:
        raise ConversionError(f"{source}: cannot express this model as a Megatron recipe: {exc}") from exc
    if shape.vocab_size % tp:
        raise ConversionError(
            f"vocab_size={shape.vocab_size} is not divisible by tensor_model_parallel_size={tp}: "
            "Megatron splits the embedding evenly across tensor-parallel ranks; choose a TP size "
            f"that divides {shape.vocab_size}"
        )
    return cfg
