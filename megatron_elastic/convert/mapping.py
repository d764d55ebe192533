"""Names, shapes and layouts: Megatron-core MoE GPT <-> Hugging Face Mixtral / Qwen3-MoE /
Qwen2-MoE / OLMoE.

Per transformer layer ``i`` (``I`` = moe_ffn_hidden_size, ``E`` = experts, ``np``/``ng`` = query
heads / query groups, ``hn`` = head dim, ``h`` = hidden size):

================================================  ==========================================
Megatron-core (model.state_dict() name)            Hugging Face (hub format)
================================================  ==========================================
embedding.word_embeddings.weight [V, h]            model.embed_tokens.weight
decoder.layers.i.input_layernorm.weight            model.layers.i.input_layernorm.weight
decoder.layers.i.self_attention.linear_qkv.weight  self_attn.{q,k,v}_proj.weight (split, below)
decoder.layers.i.self_attention.linear_proj.weight self_attn.o_proj.weight
decoder.layers.i.self_attention.linear_qkv.bias    self_attn.{q,k,v}_proj.bias (Qwen2-MoE)
decoder.layers.i.self_attention.{q,k}_layernorm    self_attn.{q,k}_norm.weight (Qwen3-MoE: [hn];
                                                   OLMoE: [np*hn] / [ng*hn], whole projection)
decoder.layers.i.pre_mlp_layernorm.weight          model.layers.i.post_attention_layernorm.weight
decoder.layers.i.mlp.router.weight [E, h]          {moe}.gate.weight
...local_experts.j.linear_fc1.weight [2I, h]       rows [0, I): gate (w1 / gate_proj);
                                                   rows [I, 2I): up (w3 / up_proj)
...local_experts.j.linear_fc2.weight [h, I]        down (w2 / down_proj)
...mlp.shared_experts.linear_fc1.weight [2S, h]    {moe}.shared_expert.{gate,up}_proj (Qwen2-MoE)
...mlp.shared_experts.linear_fc2.weight [h, S]     {moe}.shared_expert.down_proj
...mlp.shared_experts.gate_weight [1, h]           {moe}.shared_expert_gate.weight
dense layer: mlp.linear_fc1.weight [2F, h]         mlp.{gate,up}_proj.weight (Qwen2/3-MoE
dense layer: mlp.linear_fc2.weight [h, F]          mlp.down_proj.weight       mlp_only_layers)
decoder.final_layernorm.weight                     model.norm.weight
output_layer.weight [V, h]                         lm_head.weight (absent when tied)
================================================  ==========================================

``{moe}`` is ``model.layers.i.block_sparse_moe`` (Mixtral) or ``model.layers.i.mlp`` (the
others); expert ``j`` lives under ``{moe}.experts.j``. The [gate; up] order is Megatron's SwiGLU
convention (``glu`` chunks fc1's output in two and applies the activation to the first half),
which is also what transformers 5 fuses into ``gate_up_proj``; shared experts and dense MLPs use
it too. The q/k/v bias is laid out like the weight's rows (``split_qkv`` handles both).

QKV: Megatron stores one matrix per layer, grouped by query group: for each of the ``ng`` groups,
``np/ng`` query heads, then that group's key head, then its value head, each ``hn`` rows. Hugging
Face keeps three matrices with heads in order; query head ``q`` uses key/value head
``q // (np/ng)`` (``repeat_kv``), which is the same grouping. Tensor parallelism shards this
matrix by whole groups, so the *global* tensor in a distributed checkpoint has this layout under
any TP size.

Distributed-checkpoint keys differ from ``state_dict()`` names and between Megatron versions and
options; ``checkpoint_key_candidates`` lists every form this converter reads (see its docstring).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from megatron_elastic.convert import MissingTensorError, ShapeMismatchError, UnknownArchitectureError

# Our names for the supported architectures (= transformers' model_type) -> the transformers class
# written to config.json.
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
HF_CLASS_TO_ARCH = {v: k for k, v in ARCHITECTURES.items()}
MODEL_TYPE_TO_ARCH = {name: name for name in ARCHITECTURES}


def architecture_from_hf_config(config: dict, source: str = "config.json") -> str:
    """One of ``ARCHITECTURES``, 'deepseek_v3' or 'deepseek_v2' from a config.json dict;
    UnknownArchitectureError otherwise."""
    archs = config.get("architectures") or []
    for name, arch in (("DeepseekV3ForCausalLM", "deepseek_v3"), ("DeepseekV2ForCausalLM", "deepseek_v2")):
        if name in archs or (not archs and config.get("model_type") == arch):
            return arch  # their own mapping and conversion: convert/deepseek_v3*.py
    for name in archs:
        if name in HF_CLASS_TO_ARCH:
            return HF_CLASS_TO_ARCH[name]
    model_type = config.get("model_type")
    if not archs and model_type in MODEL_TYPE_TO_ARCH:
        return MODEL_TYPE_TO_ARCH[model_type]
    found = ", ".join(archs) if archs else f"model_type={model_type!r}"
    raise UnknownArchitectureError(
        f"{source}: unknown architecture {found}; this converter maps "
        f"{', '.join(sorted(HF_CLASS_TO_ARCH))}, DeepseekV3ForCausalLM, DeepseekV2ForCausalLM (model_type "
        f"{' / '.join(ARCHITECTURES)} / deepseek_v3 / deepseek_v2)"
    )


@dataclass(frozen=True)
class ModelShape:
    """Everything the weight mapping needs to know about a model's dimensions."""

    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    num_experts: int
    ffn_hidden_size: int  # per expert (Megatron moe_ffn_hidden_size, HF intermediate size)
    vocab_size: int  # rows of the embedding (Megatron's padded vocabulary)
    qk_layernorm: bool
    tied_embeddings: bool
    # Global indices of dense (non-MoE) layers and their SwiGLU width.
    dense_layers: Tuple[int, ...] = ()
    dense_ffn_hidden_size: int = 0
    shared_expert_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False
    qkv_bias: bool = False
    qk_norm_scope: str = "head"  # head | projection (whole q / k projection, OLMoE)

    def is_moe(self, layer: int) -> bool:
        return layer not in self.dense_layers

    @property
    def moe_layers(self) -> List[int]:
        return [i for i in range(self.num_layers) if self.is_moe(i)]

    def qk_norm_sizes(self) -> Tuple[int, int]:
        """(q_norm, k_norm) weight lengths."""
        if self.qk_norm_scope == "projection":
            return self.num_heads * self.head_dim, self.num_query_groups * self.head_dim
        return self.head_dim, self.head_dim

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise UnknownArchitectureError(
                f"unknown architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}"
            )
        if self.num_heads % self.num_query_groups:
            raise ShapeMismatchError(
                f"{self.num_heads} attention heads are not divisible into {self.num_query_groups} query groups"
            )

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_query_groups

    @property
    def qkv_rows(self) -> int:
        return (self.num_heads + 2 * self.num_query_groups) * self.head_dim


# ---------------------------------------------------------------------------------- QKV layout
def split_qkv(qkv: torch.Tensor, shape: ModelShape) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's grouped ``linear_qkv.weight`` (or its 1-D bias) -> contiguous (q, k, v) in
    Hugging Face order."""
    ng, per, hn = shape.num_query_groups, shape.heads_per_group, shape.head_dim
    cols = tuple(qkv.shape[1:])
    if tuple(qkv.shape) not in ((shape.qkv_rows, shape.hidden_size), (shape.qkv_rows,)):
        raise ShapeMismatchError(
            f"linear_qkv has shape {tuple(qkv.shape)}, expected "
            f"{(shape.qkv_rows, shape.hidden_size)} (or {(shape.qkv_rows,)} for the bias) for "
            f"{shape.num_heads} heads, {ng} query groups, head dim {hn}"
        )
    grouped = qkv.reshape(ng, per + 2, hn, *cols)
    q = grouped[:, :per].reshape(ng * per * hn, *cols).contiguous()
    k = grouped[:, per].reshape(ng * hn, *cols).contiguous()
    v = grouped[:, per + 1].reshape(ng * hn, *cols).contiguous()
    return q, k, v


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    """Inverse of ``split_qkv`` (weights or biases)."""
    ng, per, hn = shape.num_query_groups, shape.heads_per_group, shape.head_dim
    cols = tuple(q.shape[1:])
    grouped = torch.cat(
        [q.reshape(ng, per, hn, *cols), k.reshape(ng, 1, hn, *cols), v.reshape(ng, 1, hn, *cols)], dim=1
    )
    return grouped.reshape(shape.qkv_rows, *cols).contiguous()


# ------------------------------------------------------------------------- Megatron side
@dataclass(frozen=True)
class MegatronTensor:
    """One tensor the exporter reads: a canonical name plus the shape it must have.

    ``part`` is 'gate' or 'up' for the two row halves of an expert's ``linear_fc1`` (read
    separately so neither half has to be copied out of the fused tensor).
    """

    name: str
    shape: Tuple[int, ...]
    layer: Optional[int] = None
    expert: Optional[int] = None
    fc: Optional[int] = None  # 1 or 2 for expert tensors
    part: Optional[str] = None


def _layer_suffixes(shape: ModelShape, layer: int) -> List[Tuple[str, Tuple[int, ...]]]:
    """Layer ``layer``'s tensors that are neither experts nor fused [gate; up] MLP weights."""
    h = shape.hidden_size
    out = [
        ("input_layernorm.weight", (h,)),
        ("self_attention.linear_qkv.weight", (shape.qkv_rows, h)),
        ("self_attention.linear_proj.weight", (h, shape.num_heads * shape.head_dim)),
    ]
    if shape.qkv_bias:
        out.append(("self_attention.linear_qkv.bias", (shape.qkv_rows,)))
    if shape.qk_layernorm:
        q_size, k_size = shape.qk_norm_sizes()
        out += [
            ("self_attention.q_layernorm.weight", (q_size,)),
            ("self_attention.k_layernorm.weight", (k_size,)),
        ]
    out.append(("pre_mlp_layernorm.weight", (h,)))
    if shape.is_moe(layer):
        out.append(("mlp.router.weight", (shape.num_experts, h)))
        if shape.shared_expert_size:
            out.append(("mlp.shared_experts.linear_fc2.weight", (h, shape.shared_expert_size)))
            if shape.shared_expert_gate:
                out.append(("mlp.shared_experts.gate_weight", (1, h)))
    else:
        out.append(("mlp.linear_fc2.weight", (h, shape.dense_ffn_hidden_size)))
    return out


def _fused_mlp(shape: ModelShape, layer: int) -> Optional[Tuple[str, int]]:
    """(``linear_fc1`` suffix, rows per half) of the layer's non-expert SwiGLU: the shared expert
    of an MoE layer or the MLP of a dense layer; None when there is neither."""
    if not shape.is_moe(layer):
        return "mlp.linear_fc1.weight", shape.dense_ffn_hidden_size
    if shape.shared_expert_size:
        return "mlp.shared_experts.linear_fc1.weight", shape.shared_expert_size
    return None


def expert_name(layer: int, expert: int, fc: int) -> str:
    return f"decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc{fc}.weight"


def megatron_layer_tensors(shape: ModelShape, layer: int) -> List[MegatronTensor]:
    """What the exporter reads for layer ``layer``: attention, norms, then the router and every
    expert (plus the shared expert) of an MoE layer, or the MLP of a dense one."""
    p = f"decoder.layers.{layer}."
    tensors = [MegatronTensor(p + suffix, shp, layer=layer) for suffix, shp in _layer_suffixes(shape, layer)]
    h = shape.hidden_size
    fused = _fused_mlp(shape, layer)
    if fused is not None:
        suffix, rows = fused
        tensors += [MegatronTensor(f"{p}{suffix}[{part}]", (rows, h), layer, part=part) for part in ("gate", "up")]
    if not shape.is_moe(layer):
        return tensors
    ffn = shape.ffn_hidden_size
    for j in range(shape.num_experts):
        fc1 = expert_name(layer, j, 1)
        tensors.append(MegatronTensor(f"{fc1}[gate]", (ffn, h), layer, j, 1, "gate"))
        tensors.append(MegatronTensor(f"{fc1}[up]", (ffn, h), layer, j, 1, "up"))
        tensors.append(MegatronTensor(expert_name(layer, j, 2), (h, ffn), layer, j, 2))
    return tensors


def megatron_embedding_tensors(shape: ModelShape) -> List[MegatronTensor]:
    return [MegatronTensor("embedding.word_embeddings.weight", (shape.vocab_size, shape.hidden_size))]


def megatron_final_tensors(shape: ModelShape) -> List[MegatronTensor]:
    out = [MegatronTensor("decoder.final_layernorm.weight", (shape.hidden_size,))]
    if not shape.tied_embeddings:
        out.append(MegatronTensor("output_layer.weight", (shape.vocab_size, shape.hidden_size)))
    return out


def megatron_param_shapes(shape: ModelShape) -> Dict[str, Tuple[int, ...]]:
    """model.state_dict()-style names (full fc1) -> shapes, for the importer."""
    out = {t.name: t.shape for t in megatron_embedding_tensors(shape)}
    h, ffn = shape.hidden_size, shape.ffn_hidden_size
    for i in range(shape.num_layers):
        for suffix, shp in _layer_suffixes(shape, i):
            out[f"decoder.layers.{i}.{suffix}"] = shp
        fused = _fused_mlp(shape, i)
        if fused is not None:
            out[f"decoder.layers.{i}.{fused[0]}"] = (2 * fused[1], h)
        if shape.is_moe(i):
            for j in range(shape.num_experts):
                out[expert_name(i, j, 1)] = (2 * ffn, h)
                out[expert_name(i, j, 2)] = (h, ffn)
    out.update({t.name: t.shape for t in megatron_final_tensors(shape)})
    return out


# Alternative spellings of per-layer tensors. Megatron's local layer spec names the norms
# input_layernorm / pre_mlp_layernorm, but its sharded_state_dict_keys_map saves them under the
# Transformer Engine names (norm fused into the following linear), so a distributed checkpoint
# from either spec uses the TE names; a TE-spec MoE layer keeps a separate pre_mlp_layernorm.
_LAYER_ALIASES = {
    "input_layernorm.weight": ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    "pre_mlp_layernorm.weight": ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
}


@dataclass(frozen=True)
class Candidate:
    """A place a tensor may be stored: ``key[index][row_offset : row_offset + rows]``.

    ``axes`` names the leading indexed axes with their required sizes (layers, experts), so a
    checkpoint holding a different number of layers or experts is rejected by name rather than
    silently truncated. ``full_shape`` is the per-index shape the stored tensor must have.
    """

    key: str
    index: Tuple[int, ...] = ()
    axes: Tuple[Tuple[str, int], ...] = ()
    full_shape: Tuple[int, ...] = ()
    row_offset: int = 0


@dataclass(frozen=True)
class Ref:
    """A resolved read: the stored key, the leading index, and the row window."""

    key: str
    index: Tuple[int, ...]
    row_offset: int
    shape: Tuple[int, ...]  # what the read yields (after dropping the indexed axes)
    full_shape: Tuple[int, ...]

    @property
    def describe(self) -> str:
        idx = "".join(f"[{i}]" for i in self.index)
        rows = ""
        if self.shape and self.full_shape and self.shape[0] != self.full_shape[0]:
            rows = f"[{self.row_offset}:{self.row_offset + self.shape[0]}]"
        return f"'{self.key}'{idx}{rows}"


def checkpoint_key_candidates(t: MegatronTensor, shape: ModelShape) -> List[Candidate]:
    """Every stored form of ``t`` this converter reads, most common first.

    Layers: Megatron stacks homogeneous layers under ``decoder.layers.<suffix>`` with a leading
    layer axis; with ``non_homogeneous_layers``/``singleton_local_shards`` metadata each layer has
    its own ``decoder.layers.<i>.<suffix>`` key; a plain ``model.state_dict()`` uses the latter.

    Experts (layer prefix P as above):

    * ``P.mlp.experts.experts.linear_fcX.weight`` with an expert axis: SequentialMLP and
      TEGroupedMLP in the default distributed format (a global expert axis, so EP ranks' experts
      are all there);
    * ``P.mlp.experts.experts.<j>.linear_fcX.weight`` (SequentialMLP) and
      ``P.mlp.experts.experts.linear_fcX.weight<j>`` (TEGroupedMLP): ``singleton_local_shards``,
      where fc1 is further split into ``..._w`` (gate) and ``..._v`` (up) keys;
    * ``P.mlp.experts.local_experts.<j>.linear_fcX.weight`` (sequential) and
      ``P.mlp.experts.linear_fcX.weight<j>`` (grouped): ``model.state_dict()`` names.
    """
    L, E = shape.num_layers, shape.num_experts
    prefixes: List[Tuple[str, Tuple[int, ...], Tuple[Tuple[str, int], ...]]] = []
    if t.layer is not None:
        prefixes = [
            ("decoder.layers.", (t.layer,), (("layers", L),)),
            (f"decoder.layers.{t.layer}.", (), ()),
        ]
    if t.expert is None:
        if t.layer is None:
            return [Candidate(t.name, full_shape=t.shape)]
        suffix = t.name.split(f"decoder.layers.{t.layer}.", 1)[1]
        full_shape, offset = t.shape, 0
        if t.part is not None:  # one half of a shared-expert / dense [gate; up] fc1
            suffix = suffix[: -len(f"[{t.part}]")]
            full_shape = (2 * t.shape[0],) + t.shape[1:]
            offset = t.shape[0] if t.part == "up" else 0
        out = []
        for alias in _LAYER_ALIASES.get(suffix, (suffix,)):
            for prefix, index, axes in prefixes:
                out.append(Candidate(prefix + alias, index, axes, full_shape, offset))
        return out
    j, w = t.expert, f"linear_fc{t.fc}.weight"
    ffn = shape.ffn_hidden_size
    fused_shape = (2 * ffn, shape.hidden_size) if t.fc == 1 else t.shape
    offset = ffn if t.part == "up" else 0
    out = []
    for prefix, index, axes in prefixes:
        out.append(Candidate(f"{prefix}mlp.experts.experts.{w}", index + (j,), axes + (("experts", E),),
                             fused_shape, offset))
        singles = [f"{prefix}mlp.experts.experts.{j}.{w}", f"{prefix}mlp.experts.experts.{w}{j}"]
        for key in singles:
            if t.fc == 1:
                half = "_w" if t.part == "gate" else "_v"
                out.append(Candidate(key + half, index, axes, t.shape, 0))
            out.append(Candidate(key, index, axes, fused_shape, offset))
        for key in (f"{prefix}mlp.experts.local_experts.{j}.{w}", f"{prefix}mlp.experts.{w}{j}"):
            out.append(Candidate(key, index, axes, fused_shape, offset))
    return out


def resolve(
    t: MegatronTensor,
    shape: ModelShape,
    stored: Dict[str, Tuple[int, ...]],
    source: str,
) -> Ref:
    """Find ``t`` among ``stored`` (key -> global shape); name the tensor and shapes on failure."""
    candidates = checkpoint_key_candidates(t, shape)
    for c in candidates:
        if c.key not in stored:
            continue
        have = tuple(stored[c.key])
        n = len(c.index)
        if len(have) != n + len(c.full_shape):
            raise ShapeMismatchError(
                f"shape mismatch for '{c.key}' in {source}: stored {have}, expected "
                f"{tuple(size for _, size in c.axes) + c.full_shape} (reading {t.name})"
            )
        for axis, ((axis_name, size), got) in enumerate(zip(c.axes, have[:n])):
            if got != size:
                what = "model.num_moe_experts" if axis_name == "experts" else "model.num_layers"
                raise ShapeMismatchError(
                    f"shape mismatch for '{c.key}' in {source}: stored {have} holds {got} {axis_name} "
                    f"along axis {axis}, but the config says {what}={size} (expected "
                    f"{tuple(s for _, s in c.axes) + c.full_shape})"
                )
        if have[n:] != c.full_shape:
            raise ShapeMismatchError(
                f"shape mismatch for '{c.key}' in {source}: stored {have}, expected "
                f"{tuple(s for _, s in c.axes) + c.full_shape} from the config (reading {t.name}; "
                "check hidden_size, num_attention_heads, num_query_groups, kv_channels, "
                "moe_ffn_hidden_size and the vocabulary size)"
            )
        return Ref(c.key, c.index, c.row_offset, t.shape, c.full_shape)
    tried = ", ".join(sorted({c.key for c in candidates})[:4])
    raise MissingTensorError(
        f"{source} has no tensor for {t.name} (looked for {tried}{', ...' if len(candidates) > 4 else ''}); "
        "the checkpoint was saved from a different architecture (layers, experts, QK-norm, tied "
        "embeddings) than its config describes, or is damaged"
    )


# ----------------------------------------------------------------------- Hugging Face side
def hf_moe_prefix(arch: str, layer: int) -> str:
    return f"model.layers.{layer}." + ("block_sparse_moe." if arch == "mixtral" else "mlp.")


def hf_expert_names(arch: str, layer: int, expert: int) -> Tuple[str, str, str]:
    """(gate, up, down) names of one expert in the hub format."""
    p = f"{hf_moe_prefix(arch, layer)}experts.{expert}."
    if arch == "mixtral":
        return p + "w1.weight", p + "w3.weight", p + "w2.weight"
    return p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"


def hf_layer_names(shape: ModelShape, layer: int) -> Dict[str, str]:
    """Hub names of layer ``layer``'s tensors other than the routed experts, by role."""
    arch = shape.architecture
    p = f"model.layers.{layer}."
    names = {
        "input_layernorm": p + "input_layernorm.weight",
        "q": p + "self_attn.q_proj.weight",
        "k": p + "self_attn.k_proj.weight",
        "v": p + "self_attn.v_proj.weight",
        "o": p + "self_attn.o_proj.weight",
        "post_attention_layernorm": p + "post_attention_layernorm.weight",
    }
    if shape.qkv_bias:
        names.update(q_bias=p + "self_attn.q_proj.bias", k_bias=p + "self_attn.k_proj.bias",
                     v_bias=p + "self_attn.v_proj.bias")
    if shape.qk_layernorm:
        names["q_norm"] = p + "self_attn.q_norm.weight"
        names["k_norm"] = p + "self_attn.k_norm.weight"
    if shape.is_moe(layer):
        moe = hf_moe_prefix(arch, layer)
        names["router"] = moe + "gate.weight"
        if shape.shared_expert_size:
            names.update(mlp_gate=moe + "shared_expert.gate_proj.weight", mlp_up=moe + "shared_expert.up_proj.weight",
                         mlp_down=moe + "shared_expert.down_proj.weight")
            if shape.shared_expert_gate:
                names["shared_gate"] = moe + "shared_expert_gate.weight"
    else:
        names.update(mlp_gate=p + "mlp.gate_proj.weight", mlp_up=p + "mlp.up_proj.weight",
                     mlp_down=p + "mlp.down_proj.weight")
    return names


# Megatron suffix (after ``decoder.layers.i.``) <-> hub role in ``hf_layer_names``, for the tensors
# copied as they are.
_DIRECT = (
    ("input_layernorm.weight", "input_layernorm"),
    ("self_attention.linear_proj.weight", "o"),
    ("self_attention.q_layernorm.weight", "q_norm"),
    ("self_attention.k_layernorm.weight", "k_norm"),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm"),
    ("mlp.router.weight", "router"),
    ("mlp.shared_experts.gate_weight", "shared_gate"),
)


def _fused_mlp_suffixes(shape: ModelShape, layer: int) -> Optional[Tuple[str, str]]:
    """Megatron (fc1, fc2) suffixes of the layer's shared expert or dense MLP."""
    fused = _fused_mlp(shape, layer)
    if fused is None:
        return None
    return fused[0], fused[0].replace("linear_fc1", "linear_fc2")


def hf_expected_shapes(shape: ModelShape) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of the hub-format checkpoint with its shape, in writing order."""
    h, hn, ffn = shape.hidden_size, shape.head_dim, shape.ffn_hidden_size
    out = {"model.embed_tokens.weight": (shape.vocab_size, h)}
    q_rows, kv_rows = shape.num_heads * hn, shape.num_query_groups * hn
    for i in range(shape.num_layers):
        n = hf_layer_names(shape, i)
        out[n["input_layernorm"]] = (h,)
        out[n["q"]] = (q_rows, h)
        out[n["k"]] = (kv_rows, h)
        out[n["v"]] = (kv_rows, h)
        if shape.qkv_bias:
            out[n["q_bias"]], out[n["k_bias"]], out[n["v_bias"]] = (q_rows,), (kv_rows,), (kv_rows,)
        out[n["o"]] = (h, q_rows)
        if shape.qk_layernorm:
            out[n["q_norm"]], out[n["k_norm"]] = ((size,) for size in shape.qk_norm_sizes())
        out[n["post_attention_layernorm"]] = (h,)
        fused = _fused_mlp(shape, i)
        if fused is not None:
            rows = fused[1]
            out[n["mlp_gate"]], out[n["mlp_up"]], out[n["mlp_down"]] = (rows, h), (rows, h), (h, rows)
        if "shared_gate" in n:
            out[n["shared_gate"]] = (1, h)
        if not shape.is_moe(i):
            continue
        out[n["router"]] = (shape.num_experts, h)
        for j in range(shape.num_experts):
            gate, up, down = hf_expert_names(shape.architecture, i, j)
            out[gate], out[up], out[down] = (ffn, h), (ffn, h), (h, ffn)
    out["model.norm.weight"] = (h,)
    if not shape.tied_embeddings:
        out["lm_head.weight"] = (shape.vocab_size, h)
    return out


def megatron_to_hf_tensors(
    loaded: Dict[str, torch.Tensor], shape: ModelShape
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Map one group of loaded Megatron tensors (canonical names) to hub-format names.

    ``loaded`` holds the embedding, one layer, or the final norm/output layer; tensors are yielded
    in hub order and removed from ``loaded`` as they go so their memory can be released early.
    """
    arch = shape.architecture
    simple = {
        "embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "decoder.final_layernorm.weight": "model.norm.weight",
        "output_layer.weight": "lm_head.weight",
    }
    for name, hf in simple.items():
        if name in loaded:
            yield hf, loaded.pop(name)
    layers = sorted({int(m.group(1)) for n in loaded if (m := re.match(r"decoder\.layers\.(\d+)\.", n))})
    for i in layers:
        p = f"decoder.layers.{i}."
        n = hf_layer_names(shape, i)
        q, k, v = split_qkv(loaded.pop(p + "self_attention.linear_qkv.weight"), shape)
        yield n["q"], q
        yield n["k"], k
        yield n["v"], v
        if shape.qkv_bias:
            for role, t in zip(("q_bias", "k_bias", "v_bias"),
                               split_qkv(loaded.pop(p + "self_attention.linear_qkv.bias"), shape)):
                yield n[role], t
        for suffix, role in _DIRECT:
            if role in n:
                yield n[role], loaded.pop(p + suffix)
        fused = _fused_mlp_suffixes(shape, i)
        if fused is not None:
            yield n["mlp_gate"], loaded.pop(f"{p}{fused[0]}[gate]")
            yield n["mlp_up"], loaded.pop(f"{p}{fused[0]}[up]")
            yield n["mlp_down"], loaded.pop(p + fused[1])
        if not shape.is_moe(i):
            continue
        for j in range(shape.num_experts):
            gate, up, down = hf_expert_names(arch, i, j)
            fc1 = expert_name(i, j, 1)
            yield gate, loaded.pop(fc1 + "[gate]")
            yield up, loaded.pop(fc1 + "[up]")
            yield down, loaded.pop(expert_name(i, j, 2))
    if loaded:
        raise RuntimeError(f"internal: unmapped Megatron tensors {sorted(loaded)[:5]}")


def hf_to_megatron_layer(
    get: Callable[[str], torch.Tensor],
    get_expert: Callable[[int, int], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    shape: ModelShape,
    layer: int,
) -> Dict[str, torch.Tensor]:
    """One layer's Megatron tensors (state_dict names, full fc1) from hub-format tensors.

    ``get(name)`` returns a hub tensor; ``get_expert(layer, j)`` returns (gate, up, down) of one
    expert, wherever the source stores it (per-expert hub tensors or transformers-5 fused ones).
    """
    n = hf_layer_names(shape, layer)
    p = f"decoder.layers.{layer}."
    out = {p + "self_attention.linear_qkv.weight": merge_qkv(get(n["q"]), get(n["k"]), get(n["v"]), shape)}
    if shape.qkv_bias:
        out[p + "self_attention.linear_qkv.bias"] = merge_qkv(get(n["q_bias"]), get(n["k_bias"]),
                                                              get(n["v_bias"]), shape)
    for suffix, role in _DIRECT:
        if role in n:
            out[p + suffix] = get(n[role])
    fused = _fused_mlp_suffixes(shape, layer)
    if fused is not None:
        out[p + fused[0]] = torch.cat([get(n["mlp_gate"]), get(n["mlp_up"])], dim=0)
        out[p + fused[1]] = get(n["mlp_down"])
    if shape.is_moe(layer):
        for j in range(shape.num_experts):
            gate, up, down = get_expert(layer, j)
            out[expert_name(layer, j, 1)] = torch.cat([gate, up], dim=0)
            out[expert_name(layer, j, 2)] = down
    return out


def canonical_param_name(name: str) -> str:
    """A built model's parameter name -> the canonical state_dict name used above.

    Transformer Engine specs fuse the input norm into linear_qkv, and TEGroupedMLP names expert
    weights ``linear_fc1.weight<j>``; the local spec with SequentialMLP is already canonical.
    """
    name = re.sub(r"self_attention\.linear_qkv\.layer_norm_weight$", "input_layernorm.weight", name)
    name = re.sub(r"mlp\.linear_fc1\.layer_norm_weight$", "pre_mlp_layernorm.weight", name)
    name = re.sub(r"mlp\.experts\.linear_fc(\d)\.weight(\d+)$", r"mlp.experts.local_experts.\2.linear_fc\1.weight", name)
    return name
