"""DeepSeek-V2/V3 family (transformers ``DeepseekV3ForCausalLM`` and ``DeepseekV2ForCausalLM``) <->
Megatron-core MLA MoE GPT: model fields and tensor layouts, as pure functions on configs and tensors.

Covers DeepSeek-V3 itself, V2-Lite-like configs (``q_lora_rank: null``, one expert group) and
Moonlight: multi-latent attention (MLA), sigmoid router scores with a selection-only expert bias
(``e_score_correction_bias``), group-limited top-k (``n_group``/``topk_group``),
``routed_scaling_factor``, ``norm_topk_prob``, shared experts, and dense first layers
(``first_k_dense_replace``).

Per layer ``i`` (``n`` heads, ``d_nope``/``d_rope``/``d_v`` = qk_nope/qk_rope/v head dims,
``r_q``/``r_kv`` = q/kv LoRA ranks, ``I`` = moe_intermediate_size, ``F`` = intermediate_size,
``S`` = I * n_shared_experts), Megatron-core names as ``model.state_dict()`` gives them for
``get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True)``:

=====================================================  ==========================================
Megatron-core (decoder.layers.i.)                       Hugging Face (model.layers.i.)
=====================================================  ==========================================
input_layernorm.weight [h]                              input_layernorm.weight
self_attention.linear_q_down_proj.weight [r_q, h]       self_attn.q_a_proj.weight
self_attention.q_layernorm.weight [r_q]                 self_attn.q_a_layernorm.weight
self_attention.linear_q_up_proj.weight                  self_attn.q_b_proj.weight (rope rows *)
  [n (d_nope + d_rope), r_q]
self_attention.linear_q_proj.weight                     self_attn.q_proj.weight (q_lora_rank null,
  [n (d_nope + d_rope), h]                                rope rows *)
self_attention.linear_kv_down_proj.weight               self_attn.kv_a_proj_with_mqa.weight
  [r_kv + d_rope, h]                                      (rope rows *)
self_attention.kv_layernorm.weight [r_kv]               self_attn.kv_a_layernorm.weight
self_attention.linear_kv_up_proj.weight                 self_attn.kv_b_proj.weight
  [n (d_nope + d_v), r_kv]
self_attention.linear_proj.weight [h, n d_v]            self_attn.o_proj.weight
pre_mlp_layernorm.weight [h]                            post_attention_layernorm.weight
dense layer (i < first_k_dense_replace):
mlp.linear_fc1.weight [2F, h] = [gate; up]              mlp.gate_proj.weight, mlp.up_proj.weight
mlp.linear_fc2.weight [h, F]                            mlp.down_proj.weight
MoE layer:
mlp.router.weight [E, h]                                mlp.gate.weight
mlp.router.expert_bias [E] (fp32 buffer)                mlp.gate.e_score_correction_bias
mlp.experts.local_experts.j.linear_fc1.weight [2I, h]   mlp.experts.j.{gate,up}_proj.weight
mlp.experts.local_experts.j.linear_fc2.weight [h, I]    mlp.experts.j.down_proj.weight
mlp.shared_experts.linear_fc1.weight [2S, h]            mlp.shared_experts.{gate,up}_proj.weight
mlp.shared_experts.linear_fc2.weight [h, S]             mlp.shared_experts.down_proj.weight
=====================================================  ==========================================

(In distributed checkpoints the latent norms are stored under the TE spec's names,
``linear_{q,kv}_up_proj.layer_norm_weight``: ``models/gpt.layer_spec`` maps them.)

Both sides lay a head's query as [nope | rope] and kv_b_proj's output per head as [k_nope | v],
so those matrices map as they are. (*) RoPE: Megatron-core's MLA reads the rope dims as
interleaved pairs (x0, x1), (x2, x3), ... (``_apply_rotary_pos_emb_bshd`` with
multi_latent_attention: [evens | odds], then rotate-half), which is exactly transformers'
``rope_interleave: true`` (DeepSeek's released checkpoints and the default): those rows map as
they are. With ``rope_interleave: false`` transformers rotates [first half | second half], so the
import interleaves the rope rows of the query and of kv_a_proj_with_mqa (the halves become the
evens and the odds) and the export undoes it (``megatron_rope_rows``). The export writes
``rope_interleave: true`` unless told otherwise.

Router semantics, and where Megatron-core 0.16.1 and HF DeepseekV3TopkRouter agree
(``check_inference_k``): scores = sigmoid(logits); the choice uses scores + bias, the gate the
unbiased scores; both renormalise the selected gates and multiply by routed_scaling_factor.
They differ in two places, so such k are refused rather than silently computing something else:

* group-limited top-k ranks groups by the sum of each group's top-(k // topk_group) biased scores
  in Megatron but top-2 in HF: equal only where k // topk_group == 2; with elastic k this width
  changes with k (and is 0 for k < topk_group, where every group ties) unless the group limit is
  a no-op (one group, or topk_group == n_group, as in V2-Lite and Moonlight);
* at k = 1 Megatron keeps the raw sigmoid score while HF with norm_topk_prob renormalises it to 1;
  and Megatron always renormalises for k > 1, so norm_topk_prob: false is not expressible.

DeepSeek-V2 (``DeepseekV2ForCausalLM``: DeepSeek-V2, V2-Lite) has the same tensors without the
expert bias and routes with softmax over all experts, top-k, no renormalisation, times
routed_scaling_factor: Megatron's pre-softmax router (``moe_router_pre_softmax``), equal at every k
for ``topk_method: greedy``. ``group_limited_greedy`` ranks groups by their best score (top-1), so
it matches Megatron's top-(k // topk_group) only where k // topk_group == 1. transformers' V2 ignores
``norm_topk_prob``, which DeepSeek's own V2 code honours: true is refused as ambiguous.

RoPE scaling ``yarn`` (DeepSeek's released configs) maps onto Megatron-core MLA's YaRN fields
(``yarn_fields``): the same frequency ramp (inv_freq blend between beta_fast and beta_slow
rotations of the original context), the same cos/sin factor mscale(f, mscale) / mscale(f,
mscale_all_dim) and the same softmax scale mscale(f, mscale_all_dim)^2 / sqrt(d_q). transformers
uses mscale only when mscale_all_dim is also set, Megatron always: the import writes the values
Megatron needs for transformers' result.

Released checkpoints also hold multi-token-prediction layers (``num_nextn_predict_layers``: layer
indices >= num_hidden_layers); Megatron-core's MTP is not built here, so ``mtp_tensor_names`` lets
the import skip them, and FP8 weights (``quantization_config`` fp8 with per-block
``weight_scale_inv``) are dequantized by ``dequantize_fp8``.

Elastic k counts routed experts only; shared experts always run; dense layers have no router.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from megatron_elastic.convert import ConversionError, MissingTensorError, ShapeMismatchError

ARCH = "deepseek_v3"
HF_CLASS = "DeepseekV3ForCausalLM"
ARCH_V2, HF_CLASS_V2 = "deepseek_v2", "DeepseekV2ForCausalLM"
# DeepseekV3RMSNorm's default epsilon, which the q/kv latent norms use whatever rms_norm_eps says.
LATENT_NORM_EPS = 1e-6


# ------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class DeepseekShape:
    """The dimensions the tensor mapping needs (HF names, HF meanings)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    q_lora_rank: Optional[int]  # None: one q_proj instead of q_a_proj / q_b_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    num_experts: int
    moe_intermediate_size: int
    n_shared_experts: int
    intermediate_size: int  # dense-layer MLP width
    first_k_dense_replace: int
    vocab_size: int
    tied_embeddings: bool
    rope_interleave: bool
    expert_bias: bool = True  # V3's e_score_correction_bias; V2 has none

    @property
    def q_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace


def shape_from_hf(config) -> DeepseekShape:
    """From a ``DeepseekV3Config`` (or anything with its attributes)."""
    return DeepseekShape(
        num_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        num_heads=int(config.num_attention_heads),
        q_lora_rank=None if config.q_lora_rank is None else int(config.q_lora_rank),
        kv_lora_rank=int(config.kv_lora_rank),
        qk_nope_head_dim=int(config.qk_nope_head_dim),
        qk_rope_head_dim=int(config.qk_rope_head_dim),
        v_head_dim=int(config.v_head_dim),
        num_experts=int(config.n_routed_experts),
        moe_intermediate_size=int(config.moe_intermediate_size),
        n_shared_experts=int(config.n_shared_experts or 0),
        intermediate_size=int(config.intermediate_size),
        first_k_dense_replace=int(config.first_k_dense_replace or 0),
        vocab_size=int(config.vocab_size),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        # V2 always rotates interleaved pairs (complex multiplication), Megatron's layout.
        rope_interleave=bool(getattr(config, "rope_interleave", True)),
        expert_bias=not is_v2(config),
    )


def is_v2(config) -> bool:
    """A ``DeepseekV2Config`` (softmax router, no expert bias) rather than a V3 one."""
    return getattr(config, "model_type", None) == "deepseek_v2"


def hf_param_shapes(shape: DeepseekShape) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of the hub-format checkpoint (what save_pretrained writes) with its shape."""
    h, n = shape.hidden_size, shape.num_heads
    out = {"model.embed_tokens.weight": (shape.vocab_size, h)}
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        out[p + "input_layernorm.weight"] = (h,)
        if shape.q_lora_rank is None:
            out[a + "q_proj.weight"] = (n * shape.q_head_dim, h)
        else:
            out[a + "q_a_proj.weight"] = (shape.q_lora_rank, h)
            out[a + "q_a_layernorm.weight"] = (shape.q_lora_rank,)
            out[a + "q_b_proj.weight"] = (n * shape.q_head_dim, shape.q_lora_rank)
        out[a + "kv_a_proj_with_mqa.weight"] = (shape.kv_lora_rank + shape.qk_rope_head_dim, h)
        out[a + "kv_a_layernorm.weight"] = (shape.kv_lora_rank,)
        out[a + "kv_b_proj.weight"] = (n * (shape.qk_nope_head_dim + shape.v_head_dim), shape.kv_lora_rank)
        out[a + "o_proj.weight"] = (h, n * shape.v_head_dim)
        out[p + "post_attention_layernorm.weight"] = (h,)
        m = p + "mlp."
        if not shape.is_moe_layer(i):
            f = shape.intermediate_size
            out.update({m + "gate_proj.weight": (f, h), m + "up_proj.weight": (f, h), m + "down_proj.weight": (h, f)})
            continue
        out[m + "gate.weight"] = (shape.num_experts, h)
        if shape.expert_bias:
            out[m + "gate.e_score_correction_bias"] = (shape.num_experts,)
        f = shape.moe_intermediate_size
        for j in range(shape.num_experts):
            e = f"{m}experts.{j}."
            out.update({e + "gate_proj.weight": (f, h), e + "up_proj.weight": (f, h), e + "down_proj.weight": (h, f)})
        # n_shared_experts = 0 still builds a zero-width MLP in transformers (empty tensors).
        s = shape.shared_intermediate_size
        e = m + "shared_experts."
        out.update({e + "gate_proj.weight": (s, h), e + "up_proj.weight": (s, h), e + "down_proj.weight": (h, s)})
    out["model.norm.weight"] = (h,)
    if not shape.tied_embeddings:
        out["lm_head.weight"] = (shape.vocab_size, h)
    return out


def megatron_param_shapes(shape: DeepseekShape) -> Dict[str, Tuple[int, ...]]:
    """``model.state_dict()`` names and shapes of the matching Megatron-core MLA GPT (local spec,
    SequentialMLP experts), derived from megatron/core/transformer/multi_latent_attention.py:
    linear_q_up_proj / linear_q_proj out = heads * (qk_head_dim + qk_pos_emb_head_dim),
    linear_kv_down_proj out = kv_lora_rank + qk_pos_emb_head_dim, linear_kv_up_proj out =
    heads * (qk_head_dim + v_head_dim), linear_proj in = heads * v_head_dim."""
    h, n = shape.hidden_size, shape.num_heads
    out = {"embedding.word_embeddings.weight": (shape.vocab_size, h)}
    for i in range(shape.num_layers):
        p = f"decoder.layers.{i}."
        a = p + "self_attention."
        out[p + "input_layernorm.weight"] = (h,)
        if shape.q_lora_rank is None:
            out[a + "linear_q_proj.weight"] = (n * shape.q_head_dim, h)
        else:
            out[a + "linear_q_down_proj.weight"] = (shape.q_lora_rank, h)
            out[a + "q_layernorm.weight"] = (shape.q_lora_rank,)
            out[a + "linear_q_up_proj.weight"] = (n * shape.q_head_dim, shape.q_lora_rank)
        out[a + "linear_kv_down_proj.weight"] = (shape.kv_lora_rank + shape.qk_rope_head_dim, h)
        out[a + "kv_layernorm.weight"] = (shape.kv_lora_rank,)
        out[a + "linear_kv_up_proj.weight"] = (n * (shape.qk_nope_head_dim + shape.v_head_dim), shape.kv_lora_rank)
        out[a + "linear_proj.weight"] = (h, n * shape.v_head_dim)
        out[p + "pre_mlp_layernorm.weight"] = (h,)
        m = p + "mlp."
        if not shape.is_moe_layer(i):
            out[m + "linear_fc1.weight"] = (2 * shape.intermediate_size, h)
            out[m + "linear_fc2.weight"] = (h, shape.intermediate_size)
            continue
        out[m + "router.weight"] = (shape.num_experts, h)
        if shape.expert_bias:
            out[m + "router.expert_bias"] = (shape.num_experts,)
        f = shape.moe_intermediate_size
        for j in range(shape.num_experts):
            out[f"{m}experts.local_experts.{j}.linear_fc1.weight"] = (2 * f, h)
            out[f"{m}experts.local_experts.{j}.linear_fc2.weight"] = (h, f)
        if shape.n_shared_experts:
            out[m + "shared_experts.linear_fc1.weight"] = (2 * shape.shared_intermediate_size, h)
            out[m + "shared_experts.linear_fc2.weight"] = (h, shape.shared_intermediate_size)
    out["decoder.final_layernorm.weight"] = (h,)
    if not shape.tied_embeddings:
        out["output_layer.weight"] = (shape.vocab_size, h)
    return out


# ------------------------------------------------------------------------------ config
def check_supported(config, source: str = "config.json") -> None:
    """Refuse what the Megatron-core MLA model cannot reproduce exactly (each would change outputs)."""
    problems = []
    family = "DeepSeek-V2" if is_v2(config) else "DeepSeek-V3"
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.hidden_act} (SwiGLU with silu only)")
    if getattr(config, "attention_bias", False):
        problems.append("attention_bias=true (the Megatron model has no linear biases)")
    try:
        yarn_fields(config)
    except ConversionError as exc:
        problems.append(str(exc))
    if not math.isclose(float(config.rms_norm_eps), LATENT_NORM_EPS, rel_tol=0, abs_tol=1e-12):
        problems.append(f"rms_norm_eps={config.rms_norm_eps}: transformers' q/kv latent norms always use "
                        f"{LATENT_NORM_EPS} while Megatron uses one epsilon for every norm")
    if is_v2(config):
        if getattr(config, "mlp_bias", False):
            problems.append("mlp_bias=true (the Megatron model has no linear biases)")
        if config.topk_method not in ("greedy", "group_limited_greedy"):
            problems.append(f"topk_method={config.topk_method!r} (greedy and group_limited_greedy map)")
        if getattr(config, "norm_topk_prob", False):
            problems.append("norm_topk_prob=true (transformers' DeepseekV2 ignores it while DeepSeek's own "
                            "code renormalises: ambiguous, so not converted)")
    elif not getattr(config, "norm_topk_prob", True):
        problems.append("norm_topk_prob=false (Megatron's sigmoid router always renormalises the selected "
                        "gates for k > 1)")
    n_group = int(config.n_group or 1)
    if config.n_routed_experts % n_group:
        problems.append(f"n_routed_experts={config.n_routed_experts} not divisible by n_group={n_group}")
    if problems:
        raise ConversionError(f"{source}: unsupported {family} features: " + "; ".join(problems))
    check_inference_k(config, int(config.num_experts_per_tok), source)


def group_limit_is_active(config) -> bool:
    """Whether group-limited routing can exclude any expert (else it is a no-op)."""
    if is_v2(config) and config.topk_method != "group_limited_greedy":
        return False  # V2's greedy top-k ignores n_group / topk_group
    n_group, topk_group = int(config.n_group or 1), int(config.topk_group or 1)
    return n_group > 1 and topk_group < n_group


def supported_inference_k(config) -> List[int]:
    """Every k' at which the Megatron-core router computes exactly what HF's computes."""
    experts = int(config.n_routed_experts)
    # V2's softmax router never renormalises: every k agrees; V3 renormalises (differently at k=1).
    ks = range(1, experts + 1) if is_v2(config) else range(2, experts + 1) if getattr(
        config, "norm_topk_prob", True) else range(1, 2)
    if group_limit_is_active(config):
        # Megatron ranks groups by their top-(k // topk_group) scores; V3 by their top-2, V2 by the max.
        width = 1 if is_v2(config) else 2
        topk_group, per_group = int(config.topk_group), experts // int(config.n_group)
        ks = [k for k in ks if k // topk_group == width and k <= topk_group * per_group]
    return list(ks)


def check_inference_k(config, k: int, source: str = "config.json") -> None:
    """ConversionError naming why a (possibly elastic) k cannot match HF's router, and which k can."""
    if k in supported_inference_k(config):
        return
    allowed = supported_inference_k(config)
    if k == 1 and not is_v2(config) and getattr(config, "norm_topk_prob", True):
        why = ("at k=1 Megatron-core's sigmoid router keeps the raw score while transformers' "
               "renormalises it to 1 (norm_topk_prob)")
    elif group_limit_is_active(config):
        why = (f"with group-limited routing (n_group={config.n_group}, topk_group={config.topk_group}) "
               f"Megatron-core ranks groups by their top-(k // topk_group) scores and transformers by their "
               f"top-{1 if is_v2(config) else 2}, so they select the same experts only where k // topk_group == "
               f"{1 if is_v2(config) else 2} (and k fits in the selected groups)")
    else:
        why = f"k must lie in [2, n_routed_experts={config.n_routed_experts}]"
    raise ConversionError(
        f"{source}: k={k} cannot be reproduced: {why}. Supported k: "
        f"{_ranges(allowed) or 'none'}; choose one of them (num_experts_per_tok / elastic k range)"
    )


def _ranges(values: Iterable[int]) -> str:
    values = sorted(values)
    if not values:
        return ""
    out, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)


# ------------------------------------------------------------------------------ RoPE scaling
YARN_KEYS = ("rotary_scaling_factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim")


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_fields(config) -> dict:
    """Megatron-core MLA RoPE fields (``rope_type`` + ``YARN_KEYS`` for yarn) reproducing the HF
    config's ``rope_parameters``; ConversionError for what Megatron computes differently.

    transformers (modeling_rope_utils._compute_yarn_parameters, yarn_apply_mscale): cos/sin times
    mscale(f, mscale) / mscale(f, mscale_all_dim) when both are set, else mscale(f, 1); softmax
    scale times mscale(f, mscale_all_dim)^2 when mscale_all_dim is set. Megatron
    (YarnRotaryEmbedding, MLASelfAttention): always the ratio, and always the softmax factor.
    """
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return {"rope_type": "rope", "rotary_base": theta}
    if rope_type != "yarn":
        raise ConversionError(f"RoPE scaling {rope_type!r} (plain RoPE and yarn map to Megatron-core's MLA)")
    original = rope.get("original_max_position_embeddings")
    if not original:
        raise ConversionError("RoPE scaling 'yarn' without original_max_position_embeddings")
    factor = rope.get("factor") or float(config.max_position_embeddings) / float(original)
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if mscale_all_dim and not mscale:
        raise ConversionError(f"yarn mscale_all_dim={mscale_all_dim} without mscale: transformers then scales "
                              "cos/sin by mscale(factor) alone, which Megatron-core's ratio cannot express")
    if not mscale_all_dim:  # transformers ignores mscale here: Megatron's ratio with (1, 0) is mscale(f, 1)
        mscale, mscale_all_dim = 1.0, 0.0
    expected = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    if rope.get("attention_factor") is not None and not math.isclose(float(rope["attention_factor"]), expected,
                                                                       rel_tol=1e-9):
        raise ConversionError(f"yarn attention_factor={rope['attention_factor']} differs from the "
                              f"mscale-derived {expected} that Megatron-core applies")
    if rope.get("truncate", True) is False:
        raise ConversionError("yarn truncate=false (Megatron-core's MLA rounds the ramp bounds to integers)")
    return {"rope_type": "yarn", "rotary_base": theta, "rotary_scaling_factor": float(factor),
            "original_max_position_embeddings": int(original),
            "beta_fast": float(rope.get("beta_fast") or 32), "beta_slow": float(rope.get("beta_slow") or 1),
            "mscale": float(mscale), "mscale_all_dim": float(mscale_all_dim)}


def hf_rope_parameters(fields: Mapping) -> dict:
    """Inverse of ``yarn_fields``: transformers' ``rope_parameters``."""
    if fields.get("rope_type", "rope") == "rope":
        return {"rope_type": "default", "rope_theta": float(fields["rotary_base"])}
    if float(fields["mscale_all_dim"]) == 0 and float(fields["mscale"]) != 1:
        raise ConversionError(
            f"yarn mscale={fields['mscale']} with mscale_all_dim=0: transformers ignores mscale unless "
            "mscale_all_dim is set, so this model has no transformers equivalent")
    return {"rope_type": "yarn", "rope_theta": float(fields["rotary_base"]),
            "factor": float(fields["rotary_scaling_factor"]),
            "original_max_position_embeddings": int(fields["original_max_position_embeddings"]),
            "beta_fast": float(fields["beta_fast"]), "beta_slow": float(fields["beta_slow"]),
            "mscale": float(fields["mscale"]), "mscale_all_dim": float(fields["mscale_all_dim"])}


def megatron_fields(config) -> dict:
    """Megatron-core ``MLATransformerConfig`` fields (Megatron-LM names) for an HF DeepseekV3Config
    or DeepseekV2Config.

    ``moe_layer_freq`` is the explicit 0/1 pattern (0 = dense), ``moe_router_num_groups`` /
    ``moe_router_group_topk`` are left unset where the group limit is a no-op (so elastic k is
    unrestricted there), and the expert bias is updated at DeepSeek-V3's speed (1e-3) by
    Megatron's aux-loss-free balancing when training continues.
    """
    shape = shape_from_hf(config)
    active = group_limit_is_active(config)
    v2 = is_v2(config)
    return {
        "num_layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        "num_attention_heads": shape.num_heads,
        "ffn_hidden_size": shape.intermediate_size,
        "normalization": "RMSNorm",
        "layernorm_epsilon": float(config.rms_norm_eps),
        "multi_latent_attention": True,
        "q_lora_rank": shape.q_lora_rank,
        "kv_lora_rank": shape.kv_lora_rank,
        "qk_head_dim": shape.qk_nope_head_dim,
        "qk_pos_emb_head_dim": shape.qk_rope_head_dim,
        "v_head_dim": shape.v_head_dim,
        "qk_layernorm": True,  # MLA's q/kv latent norms (IdentityOp otherwise)
        **yarn_fields(config),
        "num_moe_experts": shape.num_experts,
        "moe_ffn_hidden_size": shape.moe_intermediate_size,
        "moe_shared_expert_intermediate_size": shape.shared_intermediate_size or None,
        "moe_layer_freq": [0 if i < shape.first_k_dense_replace else 1 for i in range(shape.num_layers)],
        "moe_router_topk": int(config.num_experts_per_tok),
        # V2: softmax over all experts, top-k, no renormalisation (Megatron's pre-softmax router).
        "moe_router_score_function": "softmax" if v2 else "sigmoid",
        "moe_router_enable_expert_bias": not v2,
        "moe_router_bias_update_rate": 1e-3,
        "moe_router_num_groups": int(config.n_group) if active else None,
        "moe_router_group_topk": int(config.topk_group) if active else None,
        "moe_router_topk_scaling_factor": float(config.routed_scaling_factor),
        "moe_router_pre_softmax": v2,
        "moe_router_dtype": "fp32",
        "untie_embeddings_and_output_weights": not shape.tied_embeddings,
        "vocab_size": shape.vocab_size,
        "max_position_embeddings": int(config.max_position_embeddings),
        "init_method_std": float(getattr(config, "initializer_range", 0.02)),
    }


def hf_class_for(fields: Mapping) -> str:
    """The transformers class computing what these Megatron router fields compute: V3 for the
    sigmoid router, V2 for softmax over all experts without renormalisation (pre-softmax)."""
    score, pre = fields.get("moe_router_score_function", "sigmoid"), bool(fields.get("moe_router_pre_softmax"))
    if score == "sigmoid" and not pre:
        return HF_CLASS
    if score == "softmax" and pre and not fields.get("moe_router_enable_expert_bias"):
        return HF_CLASS_V2
    raise ConversionError(
        f"moe_router_score_function={score}, moe_router_pre_softmax={pre}: DeepSeek-V3 routes with sigmoid "
        "scores renormalised after top-k (sigmoid, pre_softmax false), DeepSeek-V2 with a softmax over all "
        "experts and no renormalisation (softmax, pre_softmax true, no expert bias)")


def hf_config_kwargs(fields: Mapping, rope_interleave: bool = True) -> dict:
    """Inverse of ``megatron_fields``: ``DeepseekV3Config`` keyword arguments, or
    ``DeepseekV2Config`` ones where ``hf_class_for`` says V2.

    A no-op group limit comes back as n_group = topk_group = 1. ``rope_interleave`` true is
    Megatron's own RoPE layout (no row permutation); false makes ``megatron_to_hf`` reorder them.
    Multi-token-prediction layers are never written (num_nextn_predict_layers = 0).
    """
    v2 = hf_class_for(fields) == HF_CLASS_V2
    freq = list(fields["moe_layer_freq"])
    first_dense = freq.index(1) if 1 in freq else len(freq)
    if freq != [0] * first_dense + [1] * (len(freq) - first_dense):
        raise ConversionError(
            f"moe_layer_freq={freq}: DeepSeek-V3 has dense layers first and MoE layers after "
            "(first_k_dense_replace); this layer pattern has no DeepseekV3Config equivalent"
        )
    shared = fields.get("moe_shared_expert_intermediate_size") or 0
    moe_ffn = int(fields["moe_ffn_hidden_size"])
    if shared % moe_ffn:
        raise ConversionError(
            f"moe_shared_expert_intermediate_size={shared} is not a multiple of moe_ffn_hidden_size={moe_ffn}: "
            "DeepSeek-V3 sizes its shared experts as n_shared_experts * moe_intermediate_size"
        )
    kwargs = dict(
        vocab_size=int(fields["vocab_size"]),
        hidden_size=int(fields["hidden_size"]),
        intermediate_size=int(fields["ffn_hidden_size"]),
        moe_intermediate_size=moe_ffn,
        num_hidden_layers=int(fields["num_layers"]),
        num_attention_heads=int(fields["num_attention_heads"]),
        num_key_value_heads=int(fields["num_attention_heads"]),
        n_shared_experts=shared // moe_ffn,
        n_routed_experts=int(fields["num_moe_experts"]),
        routed_scaling_factor=float(fields.get("moe_router_topk_scaling_factor") or 1.0),
        kv_lora_rank=int(fields["kv_lora_rank"]),
        q_lora_rank=None if fields.get("q_lora_rank") is None else int(fields["q_lora_rank"]),
        qk_rope_head_dim=int(fields["qk_pos_emb_head_dim"]),
        v_head_dim=int(fields["v_head_dim"]),
        qk_nope_head_dim=int(fields["qk_head_dim"]),
        n_group=int(fields.get("moe_router_num_groups") or 1),
        topk_group=int(fields.get("moe_router_group_topk") or 1),
        num_experts_per_tok=int(fields["moe_router_topk"]),
        first_k_dense_replace=first_dense,
        norm_topk_prob=not v2,
        hidden_act="silu",
        max_position_embeddings=int(fields["max_position_embeddings"]),
        initializer_range=float(fields.get("init_method_std", 0.02)),
        rms_norm_eps=float(fields["layernorm_epsilon"]),
        tie_word_embeddings=not fields.get("untie_embeddings_and_output_weights", True),
        rope_parameters=hf_rope_parameters(fields),
        attention_bias=False,
    )
    if v2:
        kwargs["topk_method"] = "group_limited_greedy" if fields.get("moe_router_num_groups") else "greedy"
    else:
        kwargs.update(rope_interleave=rope_interleave, num_nextn_predict_layers=0)
    return kwargs


# ------------------------------------------------------------------------------ RoPE row layout
def _evens_then_odds(d_rope: int) -> torch.Tensor:
    """[0, 2, 4, ..., 1, 3, 5, ...]: the order in which Megatron's MLA reads the rope dims."""
    return torch.cat([torch.arange(0, d_rope, 2), torch.arange(1, d_rope, 2)])


def _reorder_rope_rows(weight: torch.Tensor, blocks: int, block_rows: int, rope_offset: int,
                       index: torch.Tensor) -> torch.Tensor:
    w = weight.reshape(blocks, block_rows, *weight.shape[1:]).clone()
    d_rope = index.numel()
    w[:, rope_offset:rope_offset + d_rope] = w[:, rope_offset:rope_offset + d_rope][:, index]
    return w.reshape(weight.shape)


def megatron_rope_rows(weight: torch.Tensor, shape: DeepseekShape, kind: str, to_hf: bool = False) -> torch.Tensor:
    """The rope rows of a query projection (``kind='q'``: every head's [nope | rope]) or of
    kv_a_proj_with_mqa (``kind='kv_a'``: [latent | rope]) in Megatron's order (``to_hf``: back).

    Identity for ``rope_interleave: true``. Otherwise Megatron reads stored rows M as
    M[evens_then_odds] and must see HF's rows H: M = H[argsort(evens_then_odds)] on import,
    H = M[evens_then_odds] on export.
    """
    if shape.rope_interleave:
        return weight
    order = _evens_then_odds(shape.qk_rope_head_dim)
    index = order if to_hf else torch.argsort(order)
    if kind == "q":
        return _reorder_rope_rows(weight, shape.num_heads, shape.q_head_dim, shape.qk_nope_head_dim, index)
    return _reorder_rope_rows(weight, 1, shape.kv_lora_rank + shape.qk_rope_head_dim, shape.kv_lora_rank, index)


# ------------------------------------------------------------------------------ tensors
def _checked(name: str, value: torch.Tensor, expected: Tuple[int, ...]) -> torch.Tensor:
    if tuple(value.shape) != tuple(expected):
        raise ShapeMismatchError(f"shape mismatch for {name}: got {tuple(value.shape)}, expected "
                                 f"{tuple(expected)} from the DeepSeek-V3 config")
    return value


def hf_to_megatron_layer(get: Callable[[str], torch.Tensor], shape: DeepseekShape, layer: int) -> Dict[str, torch.Tensor]:
    """One layer's Megatron-core tensors (state_dict names) from hub-format tensors (``get(name)``)."""
    hp, mp = f"model.layers.{layer}.", f"decoder.layers.{layer}."
    ha, ma = hp + "self_attn.", mp + "self_attention."
    out = {mp + "input_layernorm.weight": get(hp + "input_layernorm.weight")}
    if shape.q_lora_rank is None:
        out[ma + "linear_q_proj.weight"] = megatron_rope_rows(get(ha + "q_proj.weight"), shape, "q")
    else:
        out[ma + "linear_q_down_proj.weight"] = get(ha + "q_a_proj.weight")
        out[ma + "q_layernorm.weight"] = get(ha + "q_a_layernorm.weight")
        out[ma + "linear_q_up_proj.weight"] = megatron_rope_rows(get(ha + "q_b_proj.weight"), shape, "q")
    out[ma + "linear_kv_down_proj.weight"] = megatron_rope_rows(get(ha + "kv_a_proj_with_mqa.weight"), shape, "kv_a")
    out[ma + "kv_layernorm.weight"] = get(ha + "kv_a_layernorm.weight")
    out[ma + "linear_kv_up_proj.weight"] = get(ha + "kv_b_proj.weight")
    out[ma + "linear_proj.weight"] = get(ha + "o_proj.weight")
    out[mp + "pre_mlp_layernorm.weight"] = get(hp + "post_attention_layernorm.weight")
    hm, mm = hp + "mlp.", mp + "mlp."
    if not shape.is_moe_layer(layer):
        out[mm + "linear_fc1.weight"] = torch.cat([get(hm + "gate_proj.weight"), get(hm + "up_proj.weight")])
        out[mm + "linear_fc2.weight"] = get(hm + "down_proj.weight")
        return out
    out[mm + "router.weight"] = get(hm + "gate.weight")
    # Megatron keeps the bias in fp32 (TopKRouter._maintain_float32_expert_bias); so does HF.
    if shape.expert_bias:
        out[mm + "router.expert_bias"] = get(hm + "gate.e_score_correction_bias")
    for j in range(shape.num_experts):
        e = f"{hm}experts.{j}."
        out[f"{mm}experts.local_experts.{j}.linear_fc1.weight"] = torch.cat(
            [get(e + "gate_proj.weight"), get(e + "up_proj.weight")])
        out[f"{mm}experts.local_experts.{j}.linear_fc2.weight"] = get(e + "down_proj.weight")
    if shape.n_shared_experts:
        e = hm + "shared_experts."
        out[mm + "shared_experts.linear_fc1.weight"] = torch.cat([get(e + "gate_proj.weight"), get(e + "up_proj.weight")])
        out[mm + "shared_experts.linear_fc2.weight"] = get(e + "down_proj.weight")
    return out


def megatron_to_hf_layer(get: Callable[[str], torch.Tensor], shape: DeepseekShape, layer: int) -> Dict[str, torch.Tensor]:
    """Inverse of ``hf_to_megatron_layer`` (hub-format names, in hub order)."""
    hp, mp = f"model.layers.{layer}.", f"decoder.layers.{layer}."
    ha, ma = hp + "self_attn.", mp + "self_attention."
    out = {hp + "input_layernorm.weight": get(mp + "input_layernorm.weight")}
    if shape.q_lora_rank is None:
        out[ha + "q_proj.weight"] = megatron_rope_rows(get(ma + "linear_q_proj.weight"), shape, "q", to_hf=True)
    else:
        out[ha + "q_a_proj.weight"] = get(ma + "linear_q_down_proj.weight")
        out[ha + "q_a_layernorm.weight"] = get(ma + "q_layernorm.weight")
        out[ha + "q_b_proj.weight"] = megatron_rope_rows(get(ma + "linear_q_up_proj.weight"), shape, "q", to_hf=True)
    out[ha + "kv_a_proj_with_mqa.weight"] = megatron_rope_rows(
        get(ma + "linear_kv_down_proj.weight"), shape, "kv_a", to_hf=True)
    out[ha + "kv_a_layernorm.weight"] = get(ma + "kv_layernorm.weight")
    out[ha + "kv_b_proj.weight"] = get(ma + "linear_kv_up_proj.weight")
    out[ha + "o_proj.weight"] = get(ma + "linear_proj.weight")
    out[hp + "post_attention_layernorm.weight"] = get(mp + "pre_mlp_layernorm.weight")
    hm, mm = hp + "mlp.", mp + "mlp."
    if not shape.is_moe_layer(layer):
        gate, up = get(mm + "linear_fc1.weight").chunk(2, dim=0)
        out.update({hm + "gate_proj.weight": gate.contiguous(), hm + "up_proj.weight": up.contiguous(),
                    hm + "down_proj.weight": get(mm + "linear_fc2.weight")})
        return out
    out[hm + "gate.weight"] = get(mm + "router.weight")
    if shape.expert_bias:
        out[hm + "gate.e_score_correction_bias"] = get(mm + "router.expert_bias")
    for j in range(shape.num_experts):
        e = f"{hm}experts.{j}."
        gate, up = get(f"{mm}experts.local_experts.{j}.linear_fc1.weight").chunk(2, dim=0)
        out.update({e + "gate_proj.weight": gate.contiguous(), e + "up_proj.weight": up.contiguous(),
                    e + "down_proj.weight": get(f"{mm}experts.local_experts.{j}.linear_fc2.weight")})
    e = hm + "shared_experts."
    if shape.n_shared_experts:
        gate, up = get(mm + "shared_experts.linear_fc1.weight").chunk(2, dim=0)
        down = get(mm + "shared_experts.linear_fc2.weight")
    else:  # transformers still builds a zero-width shared MLP: write its empty tensors
        ref = out[hm + "gate.weight"]
        gate = up = ref.new_empty((0, shape.hidden_size))
        down = ref.new_empty((shape.hidden_size, 0))
    out.update({e + "gate_proj.weight": gate.contiguous(), e + "up_proj.weight": up.contiguous(),
                e + "down_proj.weight": down})
    return out


def mtp_tensor_names(names: Iterable[str], shape: DeepseekShape) -> List[str]:
    """The multi-token-prediction tensors among ``names``: DeepSeek stores its
    num_nextn_predict_layers MTP modules as decoder layers numbered from num_hidden_layers on."""
    out = []
    for name in names:
        parts = name.split(".")
        if (len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
                and int(parts[2]) >= shape.num_layers):
            out.append(name)
    return out


FP8_SCALE_SUFFIX = "_scale_inv"  # "<...>.weight_scale_inv" next to an fp8 "<...>.weight"


def fp8_block_size(config) -> Optional[Tuple[int, int]]:
    """(rows, cols) of a DeepSeek fp8 checkpoint's scale blocks; None without quantization;
    ConversionError for a quantization this import does not undo."""
    qc = getattr(config, "quantization_config", None)
    if not qc:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    block = qc.get("weight_block_size")
    if qc.get("quant_method") != "fp8" or qc.get("fmt", "e4m3") != "e4m3" or not block or len(block) != 2:
        raise ConversionError(
            f"quantization_config={qc}: only DeepSeek's block-wise fp8 (quant_method fp8, fmt e4m3, "
            "weight_block_size [rows, cols]) is dequantized on import; convert other quantized checkpoints "
            "to bf16 first")
    return int(block[0]), int(block[1])


def fp8_scale_shape(weight_shape: Tuple[int, ...], block: Tuple[int, int]) -> Tuple[int, int]:
    return (-(-weight_shape[0] // block[0]), -(-weight_shape[1] // block[1]))


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: Tuple[int, int]) -> torch.Tensor:
    """fp32 weight = fp8 weight * scale_inv of its (rows x cols) block (edge blocks may be partial)."""
    if tuple(scale_inv.shape) != fp8_scale_shape(tuple(weight.shape), block):
        raise ShapeMismatchError(f"fp8 scale_inv shape {tuple(scale_inv.shape)} does not tile weight "
                                 f"{tuple(weight.shape)} in {block[0]}x{block[1]} blocks")
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


_GLOBAL_HF_TO_MEGATRON = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
}


def _convert(state: Mapping[str, torch.Tensor], shape: DeepseekShape, to_megatron: bool,
             source: str) -> Dict[str, torch.Tensor]:
    have = hf_param_shapes(shape) if to_megatron else megatron_param_shapes(shape)
    want = megatron_param_shapes(shape) if to_megatron else hf_param_shapes(shape)
    used = set()

    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise MissingTensorError(f"{source} has no tensor {name} (required by its DeepSeek-V3 config)")
        used.add(name)
        return _checked(name, state[name], have[name])

    out: Dict[str, torch.Tensor] = {}
    pairs = _GLOBAL_HF_TO_MEGATRON.items() if to_megatron else ((m, h) for h, m in _GLOBAL_HF_TO_MEGATRON.items())
    for src, dst in pairs:
        if dst in want:
            out[dst] = get(src)
    layer_fn = hf_to_megatron_layer if to_megatron else megatron_to_hf_layer
    for i in range(shape.num_layers):
        out.update(layer_fn(get, shape, i))
    # Zero-width shared experts of an n_shared_experts=0 HF model carry no weights; MTP layers are
    # not built here (callers skip them: mtp_tensor_names).
    skipped = set(mtp_tensor_names(state, shape)) if to_megatron else set()
    unused = sorted(k for k in set(state) - used - skipped if not (to_megatron and state[k].numel() == 0))
    if unused:
        raise ConversionError(
            f"{source} holds tensors the DeepSeek-V3 mapping does not use, e.g. {unused[:3]} "
            "(a config that does not describe these weights)"
        )
    for name, value in out.items():
        _checked(name, value, want[name])
    return out


def hf_to_megatron(state: Mapping[str, torch.Tensor], shape: DeepseekShape,
                   source: str = "the Hugging Face checkpoint") -> Dict[str, torch.Tensor]:
    """A whole hub-format state dict -> Megatron-core state_dict names (every tensor checked)."""
    return _convert(state, shape, True, source)


def megatron_to_hf(state: Mapping[str, torch.Tensor], shape: DeepseekShape,
                   source: str = "the Megatron state") -> Dict[str, torch.Tensor]:
    """Inverse of ``hf_to_megatron``."""
    return _convert(state, shape, False, source)
