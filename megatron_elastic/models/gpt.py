"""Mixtral-style MoE GPT on Megatron-core's ``GPTModel``.

RMSNorm, SwiGLU experts, RoPE, grouped-query attention, untied embeddings. Options: QK-norm per
head (Qwen3-MoE) or over the whole q / k projection (OLMoE), q/k/v biases (Qwen2-MoE), an
always-on shared expert with a sigmoid gate (Qwen2-MoE), dense SwiGLU layers mixed in
(``model.moe_layer_freq``, Megatron's name; ``layer_specs`` returns one spec per global layer),
and multi-latent attention (DeepSeek-V2/V3, Megatron-core's ``MLASelfAttention``) with sigmoid
routing, expert bias and group-limited top-k.

The layer spec is Megatron-core's own (Transformer Engine spec when TE is importable and CUDA is
present, else the local spec) with two substitutions made through the spec, never by editing
Megatron files: the MoE module becomes ``ElasticMoELayer`` with ``ElasticRouter`` (variable
per-layer k, candidate pools, router losses), and on the local spec core attention becomes
``SDPAttention``.
"""

from __future__ import annotations

import copy
import hashlib
from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megatron_elastic.config import Config
from megatron_elastic.device import policy
from megatron_elastic.models.attention import SDPAttention
from megatron_elastic.models.norm import ProjectionRMSNorm, SequenceParallelTorchNorm


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    multiple = divisible_by * tp_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def use_bf16(cfg: Config) -> bool:
    return cfg.train.bf16 if cfg.train.bf16 is not None else policy().default_bf16


def transformer_config(cfg: Config) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    bf16 = use_bf16(cfg)
    return (MLATransformerConfig if m.multi_latent_attention else TransformerConfig)(
        **_mla_fields(cfg),
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        ffn_hidden_size=m.ffn_hidden_size or m.moe_ffn_hidden_size,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        qk_layernorm=m.qk_layernorm,
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        gated_linear_unit=True,
        activation_func=F.silu,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        attention_dropout=m.attention_dropout,
        hidden_dropout=m.hidden_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        num_moe_experts=m.num_moe_experts,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        # 1 keeps Megatron's homogeneous-layer checkpoint format; a mixed pattern goes as its list.
        moe_layer_freq=1 if all(m.moe_layer_pattern) else m.moe_layer_pattern,
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=m.moe_shared_expert_gate,
        moe_router_topk=cfg.buffer_k,
        moe_router_score_function=m.moe_router_score_function,
        moe_router_enable_expert_bias=m.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=m.moe_router_bias_update_rate,
        moe_router_num_groups=m.moe_router_num_groups,
        moe_router_group_topk=m.moe_router_group_topk,
        moe_router_topk_scaling_factor=m.moe_router_topk_scaling_factor,
        moe_router_pre_softmax=m.moe_router_pre_softmax,
        moe_router_load_balancing_type=m.moe_router_load_balancing_type,
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        moe_z_loss_coeff=m.moe_z_loss_coeff,
        moe_token_dispatcher_type=m.moe_token_dispatcher_type,
        moe_grouped_gemm=m.moe_grouped_gemm,
        moe_expert_capacity_factor=m.moe_expert_capacity_factor,
        moe_pad_expert_input_to_capacity=m.moe_pad_expert_input_to_capacity,
        moe_router_dtype=m.moe_router_dtype,
        moe_per_layer_logging=m.moe_per_layer_logging,
        moe_permute_fusion=False,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        # The GPU's initialisation path on every device: weights are allocated on the device
        # and initialised inside the RNG tracker's fork (seeded by device.seed_all); on CPU
        # compat supplies the tracker. init_weights() then makes them layout-independent.
        use_cpu_initialization=False,
        gradient_accumulation_fusion=False,
    )


def _mla_fields(cfg: Config) -> dict:
    """MLATransformerConfig's own fields (RoPE: plain, or YaRN with the model's yarn fields)."""
    m = cfg.model
    if not m.multi_latent_attention:
        return {}
    fields = dict(q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank, qk_head_dim=m.qk_head_dim,
                  qk_pos_emb_head_dim=m.qk_pos_emb_head_dim, v_head_dim=m.v_head_dim, rope_type=m.rope_type,
                  rotary_base=m.rotary_base,
                  # MLA scales the softmax by these even for plain RoPE: 1.0 / 0.0 leave it at 1/sqrt(d).
                  rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
    if m.rope_type == "yarn":
        fields.update(rotary_scaling_factor=m.rotary_scaling_factor, beta_fast=m.beta_fast, beta_slow=m.beta_slow,
                      original_max_position_embeddings=m.original_max_position_embeddings, mscale=m.mscale,
                      mscale_all_dim=m.mscale_all_dim)
    return fields


def layer_spec(cfg: Config, use_te: Optional[bool] = None, stock_moe: bool = False,
               moe: bool = True) -> ModuleSpec:
    """One transformer layer: MoE (``moe``) or dense SwiGLU MLP. ``stock_moe`` keeps
    Megatron-core's own MoELayer + TopKRouter (the baseline that benchmarks and equivalence tests
    compare the elastic modules against)."""
    from megatron_elastic.moe.layer import ElasticMoELayer
    from megatron_elastic.moe.router import ElasticRouter

    m = cfg.model
    use_te = policy().use_te_spec if use_te is None else use_te
    num_experts = m.num_moe_experts if moe else None
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts,
            moe_grouped_gemm=m.moe_grouped_gemm and moe,
            qk_layernorm=m.qk_layernorm,
            multi_latent_attention=m.multi_latent_attention,
        )
    else:
        spec = get_gpt_layer_local_spec(
            num_experts=num_experts,
            moe_grouped_gemm=m.moe_grouped_gemm and moe,
            qk_layernorm=m.qk_layernorm,
            multi_latent_attention=m.multi_latent_attention,
            normalization=m.normalization,
        )
        spec = copy.deepcopy(spec)
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
        _use_sequence_parallel_norm(spec)
        if m.multi_latent_attention and m.qk_layernorm:
            # The TE spec fuses MLA's latent norms into the up-projections (layer_norm_weight);
            # save the local spec's separate norms under those names, as Megatron's own local
            # spec does for its standard layer, so MLA checkpoints load on either spec.
            spec.submodules.sharded_state_dict_keys_map = {
                "self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
                "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_",
            }
    spec = copy.deepcopy(spec)
    if m.qk_layernorm and m.qk_norm_scope == "projection":
        attn = spec.submodules.self_attention.submodules
        attn.q_layernorm = ModuleSpec(module=ProjectionRMSNorm, params={"heads": "query"})
        attn.k_layernorm = ModuleSpec(module=ProjectionRMSNorm, params={"heads": "key"})
    if moe and not stock_moe:
        moe_spec = spec.submodules.mlp
        moe_spec.module = ElasticMoELayer
        moe_spec.submodules.router = ElasticRouter
    return spec


def layer_specs(cfg: Config, use_te: Optional[bool] = None, stock_moe: bool = False) -> List[ModuleSpec]:
    """The spec of every global layer, in depth order (MoE where ``model.moe_layer_pattern`` has
    a 1, dense elsewhere); a pipeline stage builds its slice of this list."""
    pattern = cfg.model.moe_layer_pattern
    specs = {kind: layer_spec(cfg, use_te, stock_moe, moe=bool(kind)) for kind in set(pattern)}
    return [specs[kind] for kind in pattern]


def block_spec(cfg: Config, use_te: Optional[bool] = None, stock_moe: bool = False):
    """Every layer's spec plus the final norm: on the local spec Megatron would pick its
    torch-norm wrapper for the final norm, which refuses sequence parallelism."""
    from megatron.core.transformer.transformer_block import LayerNormImpl, TransformerBlockSubmodules

    use_te = policy().use_te_spec if use_te is None else use_te
    # With TE, Megatron's own choice for a plain layer spec (LayerNormImpl, i.e. TENorm).
    return TransformerBlockSubmodules(
        layer_specs=layer_specs(cfg, use_te, stock_moe),
        layer_norm=LayerNormImpl if use_te else SequenceParallelTorchNorm,
    )


def build_model(cfg: Config, vocab_size: int, use_te: Optional[bool] = None,
                stock_moe: bool = False, vp_stage: Optional[int] = None) -> GPTModel:
    """Build the MoE GPT for this rank's shard (parallel state must be initialised): under
    pipeline parallelism the layers of this stage (model chunk ``vp_stage`` of it with virtual
    stages), with the embedding on the first stage and the output layer on the last.
    ``stock_moe``: Megatron-core's MoE layer and Top-k router instead of the elastic ones."""
    from megatron.core import parallel_state as ps

    tcfg = transformer_config(cfg)
    vocab = cfg.model.vocab_size or padded_vocab_size(
        vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size
    )
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=stage_block_spec(cfg, tcfg, block_spec(cfg, use_te, stock_moe), vp_stage),
        vocab_size=vocab,
        max_sequence_length=cfg.model.max_position_embeddings or cfg.model.seq_length,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        parallel_output=True,
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=cfg.model.rotary_base,
        vp_stage=vp_stage,
    )
    from megatron_elastic.moe.layer import attach_elastic

    if not stock_moe:
        attach_elastic(model, cfg.elastic, moe_layer_numbers(cfg, use_te))
    init_weights(model, cfg)
    return policy().move_model(model)


def build_model_chunks(cfg: Config, vocab_size: int, use_te: Optional[bool] = None,
                       stock_moe: bool = False) -> List[GPTModel]:
    """This rank's model chunks in schedule order: one per pipeline stage, or
    ``virtual_pipeline_model_parallel_size`` of them (Megatron's interleaved schedule)."""
    vp = cfg.parallel.virtual_pipeline_model_parallel_size
    if vp is None:
        return [build_model(cfg, vocab_size, use_te, stock_moe)]
    return [build_model(cfg, vocab_size, use_te, stock_moe, vp_stage=i) for i in range(vp)]


def stage_block_spec(cfg: Config, tcfg: TransformerConfig, spec, vp_stage: Optional[int]):
    """The slice of a global per-layer block spec that this pipeline stage (chunk) builds.

    ``block_spec`` describes all ``num_layers`` layers (they may differ by layer); Megatron's
    TransformerBlock builds every spec it is given, so a stage gets the specs of its global
    layers [offset, offset + layers per stage), as Megatron's ``get_gpt_decoder_block_spec``
    slices its own. A single layer spec (the Transformer Engine path) is repeated by Megatron.
    """
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    if not isinstance(spec, TransformerBlockSubmodules):
        return spec
    if len(spec.layer_specs) != cfg.model.num_layers:
        raise ValueError(f"block spec lists {len(spec.layer_specs)} layers for model.num_layers="
                         f"{cfg.model.num_layers}")
    offset = get_transformer_layer_offset(tcfg, vp_stage)
    count = get_num_layers_to_build(tcfg, vp_stage)
    return TransformerBlockSubmodules(layer_specs=spec.layer_specs[offset:offset + count],
                                      layer_norm=spec.layer_norm)


def moe_layer_numbers(cfg: Config, use_te: Optional[bool] = None) -> List[int]:
    """Global 1-based numbers of the MoE layers, in depth order (a per-layer inference k list
    has one entry per MoE layer, whichever stage holds it)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    spec = block_spec(cfg, use_te)
    if not isinstance(spec, TransformerBlockSubmodules):
        return list(range(1, cfg.model.num_layers + 1))
    numbers = []
    for i, layer in enumerate(spec.layer_specs):
        mlp = getattr(getattr(layer, "submodules", None), "mlp", None)
        module = getattr(mlp, "module", None)
        if isinstance(module, type) and issubclass(module, MoELayer):
            numbers.append(i + 1)
    return numbers


def _use_sequence_parallel_norm(spec: ModuleSpec) -> None:
    """Swap Megatron's torch-norm wrapper (which refuses sequence parallelism) for ours."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    sub = spec.submodules
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(sub, name) is WrappedTorchNorm:
            setattr(sub, name, SequenceParallelTorchNorm)
    attn = sub.self_attention.submodules
    for name in ("q_layernorm", "k_layernorm", "kv_layernorm"):  # kv_layernorm: MLA's latent norm
        if getattr(attn, name, None) is WrappedTorchNorm:
            setattr(attn, name, SequenceParallelTorchNorm)


# ---------------------------------------------------------------------- initialisation
def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_weights(model: GPTModel, cfg: Config) -> None:
    """Initialise every weight from a generator keyed by (seed, global parameter name).

    Megatron-core's initialisation depends on the parallel layout (expert j on EP rank r draws
    what expert j draws on rank 0). Keying each tensor on its *global* name and slicing the
    tensor-parallel shard out of the full tensor makes a model identical under any TP/EP layout,
    which is what lets a 2-rank expert-parallel run be compared with a 1-rank run bit for bit.
    Under pipeline parallelism a stage numbers its layers from 0: the name uses the global layer
    index (local + the stage's offset), so stage s initialises what a one-stage model does for
    the same layers. Norm weights keep their ones; output projections get Megatron's scaled std.
    """
    from megatron.core import parallel_state as ps

    std = cfg.model.init_method_std
    scaled_std = std / (2.0 * cfg.model.num_layers) ** 0.5
    tp_rank = ps.get_tensor_model_parallel_rank()
    tp_size = ps.get_tensor_model_parallel_world_size()
    etp_rank = ps.get_expert_tensor_parallel_rank()
    etp_size = ps.get_expert_tensor_parallel_world_size()
    names = expert_global_names(model)
    layer_offset = _layer_offset(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or param.dim() < 2:
                continue
            gname = global_layer_name(names.get(name, name), layer_offset)
            is_expert = ".experts." in name
            rank, size = (etp_rank, etp_size) if is_expert else (tp_rank, tp_size)
            full_shape = list(param.shape)
            dim = getattr(param, "partition_dim", -1)
            sharded = getattr(param, "tensor_model_parallel", False) and size > 1 and dim >= 0
            if sharded:
                full_shape[dim] *= size
            g = torch.Generator().manual_seed(_seed_for(cfg.train.seed, gname))
            s = scaled_std if ("linear_proj" in name or "linear_fc2" in name) else std
            full = torch.randn(full_shape, generator=g, dtype=torch.float32) * s
            if sharded:
                if "linear_fc1" in name and cfg_gated(model):
                    # A gated fc1 shard is [gate_r; up_r], not a row block of [gate; up].
                    gate, up = full.chunk(2, dim=0)
                    full = torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]])
                else:
                    full = full.chunk(size, dim=dim)[rank]
            param.copy_(full.to(param.dtype))


def _layer_offset(model: torch.nn.Module) -> int:
    """Global index of the first decoder layer a (pipeline-stage) GPTModel holds; 0 for other
    modules (e.g. a bare stack of layers, whose names carry no decoder prefix)."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    if not hasattr(model, "decoder") or getattr(model, "config", None) is None:
        return 0
    return get_transformer_layer_offset(model.config, getattr(model, "vp_stage", None))


def global_layer_name(name: str, layer_offset: int) -> str:
    """``decoder.layers.<local>.`` -> ``decoder.layers.<local + offset>.`` (the pipeline stage's
    first global layer); names outside the decoder layers are unchanged."""
    import re

    if not layer_offset:
        return name
    return re.sub(r"^decoder\.layers\.(\d+)\.",
                  lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", name)


def cfg_gated(model) -> bool:
    return bool(getattr(model.config, "gated_linear_unit", False))


def expert_global_names(model: torch.nn.Module) -> dict:
    """Map local expert parameter names to names with the global expert index."""
    import re

    mapping = {}
    for mod_name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        indices = getattr(module, "local_expert_indices", None)
        if experts is None or indices is None:
            continue
        prefix = f"{mod_name}.experts."
        for pname, _ in experts.named_parameters():
            full = prefix + pname
            m = re.match(r"local_experts\.(\d+)\.(.*)", pname)
            if m:
                mapping[full] = f"{prefix}local_experts.{indices[int(m.group(1))]}.{m.group(2)}"
                continue
            m = re.match(r"(.*weight)(\d+)$", pname)  # grouped GEMM: linear_fc1.weight{i}
            if m:
                mapping[full] = f"{prefix}local_experts.{indices[int(m.group(2))]}.{m.group(1)}"
    return mapping
