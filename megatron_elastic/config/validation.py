"""Validation: every check a run config can fail, each error naming the key and the fix.

``validate(cfg)`` checks what a config can get wrong on its own; ``validate_world(cfg, n)`` checks
the parallel layout against the number of processes, known only at launch.
"""

from __future__ import annotations

import math

from megatron_elastic.config.sections import ConfigError
from megatron_elastic.moe.schedules import DISTRIBUTIONS, SCHEDULES


def validate(cfg) -> None:
    """Everything a config can get wrong on its own; resolves the defaults that depend on other
    sections (expert-tensor-parallel size, the elastic k range and seed) first."""
    m, p, t, e = cfg.model, cfg.parallel, cfg.train, cfg.elastic
    if p.expert_tensor_parallel_size is None:
        p.expert_tensor_parallel_size = p.tensor_model_parallel_size
    # The elastic section owns its resolved values from here on (see ElasticConfig).
    if e.k_min is None:
        e.k_min = m.moe_router_topk
    if e.k_max is None:
        e.k_max = m.moe_router_topk
    if e.seed is None:
        e.seed = t.seed
    _positive(cfg, ["model.num_layers", "model.hidden_size", "model.num_attention_heads",
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
    _validate_pipeline(cfg)
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
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        raise ConfigError(f"train.peak_tflops={t.peak_tflops} must be positive (or null)")
    ck = cfg.checkpoint
    if ck.keep_last is not None and (isinstance(ck.keep_last, bool) or ck.keep_last < 1):
        raise ConfigError(
            f"checkpoint.keep_last={ck.keep_last} must be >= 1 (or null to keep every save)"
        )
    if t.lr_decay_style not in ("cosine", "linear", "constant"):
        raise ConfigError("train.lr_decay_style must be one of cosine, linear, constant")
    d = cfg.data
    if d.test_data_path and not d.valid_data_path:
        raise ConfigError("data.test_data_path needs data.valid_data_path too (with separate held-out "
                          "sets data.split is not used): set both, or neither")
    if d.dataset_type not in (None, "text", "chat"):
        raise ConfigError(f"data.dataset_type={d.dataset_type!r} must be text, chat or null (null: "
                          "chat when the data has a loss mask, else text)")
    _validate_ranges(cfg)
    _validate_layers(cfg)
    _validate_moe(cfg)
    _validate_elastic(cfg)
    _validate_mla_and_sigmoid_routing(cfg)


def _validate_pipeline(cfg) -> None:
    """Layer split over pipeline stages (and virtual stages), as Megatron-core requires it."""
    m, p = cfg.model, cfg.parallel
    pp, vp = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    if vp is not None:
        if isinstance(vp, bool) or not isinstance(vp, int) or vp < 1:
            raise ConfigError(
                f"parallel.virtual_pipeline_model_parallel_size={vp!r} must be a positive integer "
                "(or null for one model chunk per pipeline stage)"
            )
        if pp == 1:
            raise ConfigError(
                "parallel.virtual_pipeline_model_parallel_size needs "
                "parallel.pipeline_model_parallel_size > 1 (it interleaves model chunks over "
                "pipeline stages): set it to null, or raise the pipeline size"
            )
    chunks = pp * (vp or 1)
    if m.num_layers % chunks:
        what = f"pipeline stages x virtual stages = {pp} x {vp}" if vp else f"pipeline stages = {pp}"
        raise ConfigError(
            f"model.num_layers={m.num_layers} is not divisible by {what}: every stage holds the "
            f"same number of layers here; choose num_layers a multiple of {chunks}, or fewer stages"
        )
    if pp > 1 and not m.untie_embeddings_and_output_weights:
        raise ConfigError(
            "model.untie_embeddings_and_output_weights=false (tied embeddings) is not supported "
            "with parallel.pipeline_model_parallel_size > 1: the input embedding and the output "
            "layer live on different stages; set model.untie_embeddings_and_output_weights=true"
        )


def _validate_pipeline_microbatches(cfg, data_parallel: int) -> None:
    """Megatron's schedules need at least one micro-batch per stage in flight (1F1B), and the
    interleaved schedule whole groups of ``pipeline size`` micro-batches."""
    p, t = cfg.parallel, cfg.train
    pp, vp = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    if pp == 1:
        return
    num_mb = t.global_batch_size // (t.micro_batch_size * data_parallel)
    if num_mb < pp:
        raise ConfigError(
            f"{num_mb} micro-batches per iteration (train.global_batch_size={t.global_batch_size} / "
            f"(train.micro_batch_size={t.micro_batch_size} x data parallel {data_parallel})) is "
            f"fewer than parallel.pipeline_model_parallel_size={pp}: the pipeline would never "
            f"fill; raise train.global_batch_size to at least {pp * t.micro_batch_size * data_parallel}"
        )
    if vp is not None and num_mb % pp:
        raise ConfigError(
            f"{num_mb} micro-batches per iteration is not a multiple of "
            f"parallel.pipeline_model_parallel_size={pp}, which the interleaved schedule "
            "(parallel.virtual_pipeline_model_parallel_size) needs: change train.global_batch_size"
        )


def _validate_ranges(cfg) -> None:
    """Numeric ranges: each value that would make training meaningless or crash later."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if not t.lr > 0:
        raise ConfigError(f"train.lr={t.lr} must be > 0 (e.g. train.lr=3e-4)")
    if not 0 <= t.min_lr <= t.lr:
        raise ConfigError(
            f"train.min_lr={t.min_lr} must lie in [0, train.lr={t.lr}]: lower train.min_lr"
        )
    if t.lr_warmup_iters < 0:
        raise ConfigError(f"train.lr_warmup_iters={t.lr_warmup_iters} must be >= 0")
    # The schedule spans lr_decay_iters when set (a run may stop early at train_iters and be
    # resumed, as launchers/smoke.sh does), else train_iters.
    span_key = "train.lr_decay_iters" if t.lr_decay_iters is not None else "train.train_iters"
    span = t.lr_decay_iters if t.lr_decay_iters is not None else t.train_iters
    if t.lr_warmup_iters > span:
        raise ConfigError(
            f"train.lr_warmup_iters={t.lr_warmup_iters} exceeds {span_key}={span}: the learning "
            f"rate would never reach train.lr; set train.lr_warmup_iters <= {span}"
        )
    for key, value in (("model.hidden_dropout", m.hidden_dropout),
                       ("model.attention_dropout", m.attention_dropout)):
        if not 0 <= value < 1:
            raise ConfigError(f"{key}={value} must lie in [0, 1) (0 = no dropout)")
    if t.weight_decay < 0:
        raise ConfigError(f"train.weight_decay={t.weight_decay} must be >= 0 (0 = none)")
    if t.clip_grad < 0:
        raise ConfigError(f"train.clip_grad={t.clip_grad} must be >= 0 (0 = no clipping)")
    for key, value in (("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2)):
        if not 0 <= value < 1:
            raise ConfigError(f"{key}={value} must lie in [0, 1) (typical: 0.9 and 0.95)")
    if not t.adam_eps > 0:
        raise ConfigError(f"train.adam_eps={t.adam_eps} must be > 0 (e.g. 1e-8)")
    for key, value in (("train.eval_iters", t.eval_iters), ("train.eval_interval", t.eval_interval),
                       ("train.max_consecutive_skips", t.max_consecutive_skips),
                       ("data.num_workers", cfg.data.num_workers)):
        if value is None or value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    if not m.init_method_std > 0:
        raise ConfigError(f"model.init_method_std={m.init_method_std} must be > 0 (e.g. 0.02)")
    if not m.norm_epsilon > 0:
        raise ConfigError(f"model.norm_epsilon={m.norm_epsilon} must be > 0 (e.g. 1e-5)")
    if m.make_vocab_size_divisible_by < 1:
        raise ConfigError(
            f"model.make_vocab_size_divisible_by={m.make_vocab_size_divisible_by} must be >= 1"
        )
    if m.vocab_size is not None:
        if m.vocab_size < 1:
            raise ConfigError(f"model.vocab_size={m.vocab_size} must be positive (or null)")
        if m.vocab_size % p.tensor_model_parallel_size:
            raise ConfigError(
                f"model.vocab_size={m.vocab_size} is not divisible by "
                f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size}: Megatron "
                "splits the embedding evenly; pad model.vocab_size or set it to null"
            )
    if not p.distributed_timeout_minutes > 0:
        raise ConfigError(
            f"parallel.distributed_timeout_minutes={p.distributed_timeout_minutes} must be > 0"
        )

def _validate_layers(cfg) -> None:
    """Which layers are MoE, shared experts, QK-norm scope and qkv biases."""
    m, p = cfg.model, cfg.parallel
    pattern = m.moe_layer_pattern  # ConfigError naming moe_layer_freq when malformed
    if not any(pattern):
        raise ConfigError(
            f"model.moe_layer_freq={m.moe_layer_freq!r} makes no layer MoE: elastic k needs at "
            "least one MoE layer (set a 1 for it)"
        )
    if not all(pattern) and (m.ffn_hidden_size is None or m.ffn_hidden_size < 1):
        raise ConfigError(
            f"model.moe_layer_freq={m.moe_layer_freq!r} has dense layers but model.ffn_hidden_size "
            f"is {m.ffn_hidden_size}: set the dense MLP width (e.g. model.ffn_hidden_size="
            f"{4 * m.hidden_size})"
        )
    size = m.moe_shared_expert_intermediate_size
    if size is not None and size < 1:
        raise ConfigError(
            f"model.moe_shared_expert_intermediate_size={size} must be a positive width (or null "
            "for no shared expert)"
        )
    if m.moe_shared_expert_gate and size is None:
        raise ConfigError(
            "model.moe_shared_expert_gate=true needs a shared expert: set "
            "model.moe_shared_expert_intermediate_size"
        )
    if m.qk_norm_scope not in ("head", "projection"):
        raise ConfigError(f"model.qk_norm_scope={m.qk_norm_scope!r} must be 'head' or 'projection'")
    if m.qk_norm_scope == "projection":
        if not m.qk_layernorm:
            raise ConfigError(
                "model.qk_norm_scope=projection needs model.qk_layernorm=true (the scope says what "
                "QK-norm normalises; without QK-norm there is nothing to scope)"
            )
        if p.tensor_model_parallel_size > 1:
            raise ConfigError(
                "model.qk_norm_scope=projection normalises over all heads of q / k, but tensor "
                "parallelism splits the heads across ranks (the norm would need a cross-rank "
                "reduction, not implemented): use parallel.tensor_model_parallel_size=1 (expert "
                "and data parallelism work)"
            )


def _validate_moe(cfg) -> None:
    """MoE settings Megatron-core asserts on while building the model, refused up front."""
    m = cfg.model
    lb_types = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
    if m.moe_router_load_balancing_type not in lb_types:
        raise ConfigError(
            f"model.moe_router_load_balancing_type={m.moe_router_load_balancing_type!r} is not "
            f"one of {', '.join(lb_types)}"
        )
    if m.moe_aux_loss_coeff < 0:
        raise ConfigError(f"model.moe_aux_loss_coeff={m.moe_aux_loss_coeff} must be >= 0")
    if m.moe_z_loss_coeff is not None and m.moe_z_loss_coeff < 0:
        raise ConfigError(f"model.moe_z_loss_coeff={m.moe_z_loss_coeff} must be >= 0 (or null)")
    if m.moe_router_dtype not in (None, "fp32", "fp64"):
        raise ConfigError(
            f"model.moe_router_dtype={m.moe_router_dtype!r} must be fp32, fp64 or null"
        )
    if m.moe_expert_capacity_factor is not None:
        if not m.moe_expert_capacity_factor > 0:
            raise ConfigError(
                f"model.moe_expert_capacity_factor={m.moe_expert_capacity_factor} must be > 0 "
                "(or null for no token dropping)"
            )
        if m.moe_router_load_balancing_type == "sinkhorn":
            raise ConfigError(
                "model.moe_expert_capacity_factor does not work with "
                "model.moe_router_load_balancing_type=sinkhorn: use aux_loss, or set the "
                "capacity factor to null"
            )
    elif m.moe_pad_expert_input_to_capacity:
        raise ConfigError(
            "model.moe_pad_expert_input_to_capacity=true needs model.moe_expert_capacity_factor"
            " (e.g. 1.0): set one, or set the padding to false"
        )
    if (m.moe_pad_expert_input_to_capacity and cfg.elastic.schedule in ("microbatch", "layerwise")
            and cfg.parallel.expert_model_parallel_size > 1):
        # k is drawn per global micro-batch (moe/context.py), so the ranks of an expert-parallel
        # group route one layer with different k at once; padded buffers sized by k would then
        # differ in shape across the equal-split all-to-all.
        raise ConfigError(
            f"model.moe_pad_expert_input_to_capacity=true with elastic.schedule="
            f"{cfg.elastic.schedule} and parallel.expert_model_parallel_size="
            f"{cfg.parallel.expert_model_parallel_size}: expert-parallel ranks hold different "
            "micro-batches, which draw different k, so padded expert buffers would differ in "
            "shape between them. Set model.moe_pad_expert_input_to_capacity=false (token dropping "
            "with the capacity factor still works), or use elastic.schedule=batch"
        )
    # Megatron's TransformerConfig refuses top-1 routing with renormalised softmax gates: the
    # single selected expert's gate is softmax over one logit, always 1, so the router would
    # get no gradient from the language-model loss. It sees the largest k any step routes
    # with (buffer_k); elastic schedules that draw k = 1 for some layers and steps (k_max > 1)
    # route those through ElasticRouter and are fine (README: gate semantics).
    if (cfg.buffer_k == 1 and m.moe_router_score_function == "softmax"
            and not m.moe_router_pre_softmax and m.moe_router_load_balancing_type != "sinkhorn"):
        raise ConfigError(
            "model.moe_router_topk=1 (elastic k range [1, 1]) with renormalised softmax gates "
            "(model.moe_router_pre_softmax=false) gives every token a gate of 1 and the router "
            "no gradient (Megatron-core refuses it): set model.moe_router_pre_softmax=true, or "
            "train a k range with elastic.k_max > 1"
        )

def _validate_elastic(cfg) -> None:
    e, m = cfg.elastic, cfg.model
    n = m.num_moe_experts
    if e.schedule not in SCHEDULES:
        raise ConfigError(f"elastic.schedule={e.schedule!r} is not one of {', '.join(SCHEDULES)}")
    if e.distribution not in DISTRIBUTIONS:
        raise ConfigError(
            f"elastic.distribution={e.distribution!r} is not one of {', '.join(DISTRIBUTIONS)}"
        )
    k_min, k_max = cfg.elastic_k_min, cfg.elastic_k_max
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
            raise ConfigError(
                "elastic.schedule=top_p does not combine with elastic.pool_ratio (the candidate "
                "pool needs one k per layer to size it): set elastic.pool_ratio=null, or use "
                "a per-layer schedule such as layerwise with the pool"
            )
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
        moe_layers = m.moe_layers
        if isinstance(e.eval_k, list) and len(ks) != len(moe_layers):
            dense = len(moe_layers) != m.num_layers
            raise ConfigError(
                f"elastic.eval_k lists {len(ks)} values but the model has {len(moe_layers)} MoE "
                "layers: give one k per MoE layer, in depth order"
                + (f" (the MoE layers are {moe_layers}; dense layers have no k)" if dense else "")
            )
        for k in ks:
            if not isinstance(k, int) or not 1 <= k <= n:
                raise ConfigError(f"elastic.eval_k value {k!r} must be an int in [1, {n}]")


def _validate_rope_type(m) -> None:
    """model.rope_type: plain RoPE, or YaRN (Megatron-core builds it inside MLA only)."""
    if m.rope_type not in ("rope", "yarn"):
        raise ConfigError(f"model.rope_type={m.rope_type!r} must be 'rope' or 'yarn'")
    if m.rope_type != "yarn":
        return
    if not m.multi_latent_attention:
        raise ConfigError("model.rope_type=yarn is built by Megatron-core's multi-latent attention only: set "
                          "model.multi_latent_attention=true, or model.rope_type=rope")
    if not isinstance(m.original_max_position_embeddings, int) or m.original_max_position_embeddings < 1:
        raise ConfigError(f"model.original_max_position_embeddings={m.original_max_position_embeddings!r}: YaRN "
                          "needs the pretraining context length (a positive int)")
    if not m.rotary_scaling_factor > 0 or not m.beta_fast > 0 or not m.beta_slow > 0:
        raise ConfigError(f"model.rotary_scaling_factor={m.rotary_scaling_factor}, beta_fast={m.beta_fast}, "
                          f"beta_slow={m.beta_slow}: YaRN needs positive values")


def _validate_mla_and_sigmoid_routing(cfg) -> None:
    """Multi-latent attention and DeepSeek-style routing (expert bias, group-limited top-k)."""
    m, e = cfg.model, cfg.elastic
    if m.multi_latent_attention:
        for key in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            value = getattr(m, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{key}={value!r}: multi-latent attention needs a positive int")
        if m.q_lora_rank is not None and (not isinstance(m.q_lora_rank, int) or m.q_lora_rank < 1):
            raise ConfigError(f"model.q_lora_rank={m.q_lora_rank!r} must be a positive int, or null "
                              "for an uncompressed query")
        if m.qk_pos_emb_head_dim % 2:
            raise ConfigError(f"model.qk_pos_emb_head_dim={m.qk_pos_emb_head_dim} must be even (RoPE "
                              "rotates pairs of dims)")
        if m.num_query_groups != m.num_attention_heads:
            raise ConfigError(
                f"model.num_query_groups={m.num_query_groups}: multi-latent attention has one key/value "
                f"head per query head; set model.num_query_groups={m.num_attention_heads}")
    _validate_rope_type(m)
    if m.moe_router_enable_expert_bias and m.moe_router_score_function != "sigmoid":
        raise ConfigError("model.moe_router_enable_expert_bias=true needs "
                          "model.moe_router_score_function=sigmoid (Megatron-core's aux-loss-free balancing)")
    groups, group_topk = m.moe_router_num_groups, m.moe_router_group_topk
    if (groups is None) != (group_topk is None):
        raise ConfigError("model.moe_router_num_groups and model.moe_router_group_topk go together: set "
                          "both (group-limited top-k) or neither")
    if groups is not None:
        if groups < 1 or m.num_moe_experts % groups or not 1 <= group_topk <= groups:
            raise ConfigError(
                f"group-limited routing needs model.num_moe_experts={m.num_moe_experts} divisible by "
                f"model.moe_router_num_groups={groups} and 1 <= model.moe_router_group_topk={group_topk} "
                "<= the number of groups")
        # Megatron-core ranks groups by the sum of their top-(k // group_topk) scores: with elastic
        # k that width, and so the groups a token may use, would change with k (k < group_topk
        # scores every group 0). Every k this run routes with must share one width.
        ks = set(range(cfg.elastic_k_min, cfg.elastic_k_max + 1))
        if e.eval_k is not None:
            ks |= set(e.eval_k if isinstance(e.eval_k, list) else [e.eval_k])
        reachable = group_topk * (m.num_moe_experts // groups)
        if max(ks) > reachable:
            raise ConfigError(
                f"k={max(ks)} exceeds the {reachable} experts of the model.moe_router_group_topk={group_topk} "
                f"groups a token may use: lower the k range / elastic.eval_k, or raise the group top-k")
        widths = {k // group_topk for k in ks}
        if len(widths) != 1 or 0 in widths:
            width = max(1, cfg.elastic_k_max // group_topk)
            lo, hi = group_topk * width, group_topk * (width + 1) - 1
            raise ConfigError(
                f"k values {sorted(ks)} with group-limited routing (model.moe_router_group_topk={group_topk}): "
                "Megatron-core ranks groups by their top-(k // group_topk) scores, so the groups a token may "
                f"use would change with k; keep every k (elastic.k_min/k_max, elastic.eval_k) within one "
                f"width, e.g. [{lo}, {hi}], or set model.moe_router_num_groups/group_topk to null")
    if (m.moe_router_enable_expert_bias or groups is not None) and (e.pool_ratio is not None or e.schedule == "top_p"):
        raise ConfigError(
            "elastic.pool_ratio / elastic.schedule=top_p choose experts from the plain router scores, "
            "without model.moe_router_enable_expert_bias's bias or the group limit: use a per-k "
            "schedule (fixed, batch, microbatch, layerwise) with these routers")


def validate_world(cfg, world_size: int) -> int:
    """Check the parallel layout against the process count; return the data-parallel size."""
    p, t = cfg.parallel, cfg.train
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
    _validate_pipeline_microbatches(cfg, dp)
    return dp


def pool_size(k: int, pool_ratio: float) -> int:
    """k_ideal before clipping to the expert count (the router uses candidate_pool_size)."""
    return max(k, math.ceil(pool_ratio * k - 1e-9))


def _positive(cfg, keys):
    for dotted in keys:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value is None or value < 1:
            raise ConfigError(f"{dotted}={value} must be a positive integer")
