"""The recipe's sections as typed dataclasses (Megatron-LM's names), and the config error type.

``ElasticConfig`` also owns the derived k values every other module reads (k_range, k_train,
default_eval_k) once ``validation.validate`` has resolved its defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the key and the fix."""


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: Optional[int] = None  # default hidden_size // num_attention_heads
    ffn_hidden_size: Optional[int] = None  # dense MLP width: needed when moe_layer_freq has dense layers
    seq_length: int = 128
    max_position_embeddings: Optional[int] = None  # default seq_length
    vocab_size: Optional[int] = None  # default: the tokenizer's, padded
    make_vocab_size_divisible_by: int = 64
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    qk_layernorm: bool = False
    # What QK-norm normalises: each head (Megatron, Qwen3-MoE) or the whole q / k projection
    # (OLMoE; tensor parallel size 1 only).
    qk_norm_scope: str = "head"
    add_qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2-MoE); no other biases
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
    # Multi-latent attention (DeepSeek-V2/V3; Megatron-core MLATransformerConfig names). With it,
    # kv_channels is unused, num_query_groups must equal num_attention_heads, and qk_layernorm
    # switches on the q/kv latent norms.
    multi_latent_attention: bool = False
    q_lora_rank: Optional[int] = None  # null: one linear_q_proj, no query compression
    kv_lora_rank: Optional[int] = None
    qk_head_dim: Optional[int] = None  # per-head query/key dims without position embedding
    qk_pos_emb_head_dim: Optional[int] = None  # per-head rotary dims (a key part shared by heads)
    v_head_dim: Optional[int] = None
    # MLA's RoPE (Megatron-core MLATransformerConfig names): "rope", or "yarn" (YaRN context
    # extension, as DeepSeek-V2/V3 release it) with its scaling factor, pretraining context, ramp
    # bounds and attention-scale exponents; the yarn fields are used only with rope_type yarn.
    rope_type: str = "rope"
    rotary_scaling_factor: float = 1.0
    original_max_position_embeddings: Optional[int] = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    # DeepSeek-style routing (sigmoid scores): a selection-only expert bias updated by Megatron's
    # aux-loss-free balancing (rate 0 keeps it fixed), group-limited top-k, a gate scale.
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3
    moe_router_num_groups: Optional[int] = None
    moe_router_group_topk: Optional[int] = None
    moe_router_topk_scaling_factor: Optional[float] = None
    # Which layers are MoE (Megatron's moe_layer_freq): an int N = every N-th layer from layer 0,
    # or one 0/1 per layer (0 = dense SwiGLU MLP of ffn_hidden_size).
    moe_layer_freq: Any = 1
    # An always-on shared expert in every MoE layer (Qwen2-MoE), optionally scaled by a sigmoid gate.
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_shared_expert_gate: bool = False

    @property
    def moe_layer_pattern(self) -> List[int]:
        """One 0/1 per global layer (1 = MoE), from moe_layer_freq as Megatron-core reads it."""
        freq = self.moe_layer_freq
        if isinstance(freq, int) and not isinstance(freq, bool):
            if freq < 1:
                raise ConfigError(f"model.moe_layer_freq={freq} must be >= 1 (or a 0/1 list per layer)")
            return [1 if i % freq == 0 else 0 for i in range(self.num_layers)]
        if isinstance(freq, list) and all(v in (0, 1) and not isinstance(v, bool) for v in freq):
            if len(freq) != self.num_layers:
                raise ConfigError(
                    f"model.moe_layer_freq lists {len(freq)} entries for model.num_layers="
                    f"{self.num_layers}: give one 0 (dense) or 1 (MoE) per layer"
                )
            return list(freq)
        raise ConfigError(
            f"model.moe_layer_freq={freq!r} must be an int >= 1 or a list of 0/1, one per layer"
        )

    @property
    def moe_layers(self) -> List[int]:
        """Global indices of the MoE layers, in depth order: every per-layer k list (elastic.eval_k,
        elastic_moe.inference_k, set_inference_k) has one entry per index here."""
        return [i for i, v in enumerate(self.moe_layer_pattern) if v]


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Model chunks per pipeline stage (Megatron's interleaved 1F1B); null = one chunk per stage.
    virtual_pipeline_model_parallel_size: Optional[int] = None
    expert_model_parallel_size: int = 1
    # Default: tensor_model_parallel_size, as in Megatron-LM.
    expert_tensor_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    distributed_backend: Optional[str] = None  # default: nccl with CUDA, gloo without
    # Timeout of every collective and of the rendezvous; a float (0.25 = 15 s) for short tests.
    # MEGATRON_ELASTIC_TIMEOUT_S (seconds) overrides it. A rank whose peer died exits within it.
    distributed_timeout_minutes: float = 10.0


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
    # Steps whose loss or gradient norm is not finite are skipped (no update); this many in a
    # row stop the run with an error and without a checkpoint. 0 = never stop.
    max_consecutive_skips: int = 5
    # Dense bf16 peak TFLOP/s of one device, for MFU on hardware training/flops.py does not know.
    peak_tflops: Optional[float] = None


@dataclass
class DataConfig:
    # Megatron blend syntax: [prefix] or [weight, prefix, weight, prefix, ...].
    data_path: List[Any] = field(default_factory=list)
    split: str = "949,50,1"
    # Separate validation / test data (Megatron-LM's --valid-data-path / --test-data-path): when
    # set, data_path is used whole for training (split is ignored) and these are read in an
    # order fixed by valid_seed alone, so runs with different train.seed, train_iters or
    # eval_interval score the same validation samples.
    valid_data_path: Optional[List[Any]] = None
    test_data_path: Optional[List[Any]] = None
    valid_seed: int = 1234
    # A sentencepiece .model file, or a Hugging Face tokenizer directory (with tokenizer.json).
    tokenizer_model: Optional[str] = None
    num_workers: int = 0
    # text: documents packed into sequences (GPTDataset); chat: one conversation per sequence,
    # loss on assistant tokens only (data/chat_dataset.py); null: from the data (chat when the
    # prefix has the loss-mask files tools/preprocess_data.py --chat writes).
    dataset_type: Optional[str] = None
    cache_path: Optional[str] = None
    mmap_bin_files: bool = True


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    finetune: bool = False  # load weights only: fresh optimizer, scheduler and iteration
    # keep the newest N finished saves (older ones are deleted after each save); null keeps all
    keep_last: Optional[int] = None
    # a damaged checkpoint (manifest mismatch, bad tracker) loads the newest complete earlier one
    fallback_to_last_good: bool = False
    # CRC32 every saved file into the manifest (catches bit flips, not only missing/cut files);
    # reads the save back: ~6-7% of a save's time on the smoke model, so off by default
    checksum: bool = False


# Keys a recipe may still carry from earlier versions: name -> the one value that is accepted
# (and dropped), with the error for any other value.
RETIRED_CHECKPOINT_KEYS = {
    "async_save": (False, "checkpoint.async_save is not supported: remove it; saves are synchronous "
                          "and durable"),
}


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

    # Derived values: the one rule for each k the rest of the package reads. Config.validate()
    # resolves k_min / k_max / seed first (defaults: model.moe_router_topk, train.seed).
    @property
    def k_range(self) -> tuple:
        return (self.k_min, self.k_max)

    @property
    def k_train(self) -> int:
        """The k a fixed schedule trains (k_min == k_max); the largest k a varying one draws."""
        return self.k_max

    @property
    def default_eval_k(self) -> int:
        """The k' a model evaluates with when nothing is set: eval_k when it is one int."""
        return self.eval_k if isinstance(self.eval_k, int) else self.k_train


SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "elastic": ElasticConfig,
}
