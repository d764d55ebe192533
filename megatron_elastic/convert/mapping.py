"""Names, shapes and layouts: Megatron-core MoE GPT <-> Hugging Face Mixtral / Qwen3-MoE.

Per transformer layer ``i`` (``I`` = moe_ffn_hidden_size, ``E`` = experts, ``np``/``ng`` = query
heads / query groups, ``hn`` = head dim, ``h`` = hidden size):

================================================  ==========================================
Megatron-core (model.state_dict() name)            Hugging Face (hub format)
================================================  ==========================================
embedding.word_embeddings.weight [V, h]            model.embed_tokens.weight
decoder.layers.i.input_layernorm.weight            model.layers.i.input_layernorm.weight
decoder.layers.i.self_attention.linear_qkv.weight  self_attn.{q,k,v}_proj.weight (split, below)
decoder.layers.i.self_attention.linear_proj.weight self_attn.o_proj.weight
decoder.layers.i.self_attention.{q,k}_layernorm    self_attn.{q,k}_norm.weight (Qwen3-MoE only)
decoder.layers.i.pre_mlp_layernorm.weight          model.layers.i.post_attention_layernorm.weight
decoder.layers.i.mlp.router.weight [E, h]          {moe}.gate.weight
...local_experts.j.linear_fc1.weight [2I, h]       rows [0, I): gate (w1 / gate_proj);
                                                   rows [I, 2I): up (w3 / up_proj)
...local_experts.j.linear_fc2.weight [h, I]        down (w2 / down_proj)
decoder.final_layernorm.weight                     model.norm.weight
output_layer.weight [V, h]                         lm_head.weight (absent when tied)
================================================  ==========================================

``{moe}`` is ``model.layers.i.block_sparse_moe`` (Mixtral) or ``model.layers.i.mlp`` (Qwen3-MoE);
expert ``j`` lives under ``{moe}.experts.j``. The [gate; up] order is Megatron's SwiGLU
convention (``glu`` chunks fc1's output in two and applies the activation to the first half),
which is also what transformers 5 fuses into ``gate_up_proj``.

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

# Our names for the two supported architectures -> the transformers class written to config.json.
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
HF_CLASS_TO_ARCH = {v: k for k, v in ARCHITECTURES.items()}
MODEL_TYPE_TO_ARCH = {"mixtral": "mixtral", "qwen3_moe": "qwen3_moe"}


def architecture_from_hf_config(config: dict, source: str = "config.json") -> str:
    """'mixtral', 'qwen3_moe', 'deepseek_v3' or 'deepseek_v2' from a config.json dict;
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
        f"{', '.join(sorted(HF_CLASS_TO_ARCH))}, DeepseekV3ForCausalLM, DeepseekV2ForCausalLM (model_type mixtral / "
        "qwen3_moe / deepseek_v3 / deepseek_v2)"
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
    """Megatron's grouped ``linear_qkv.weight`` -> contiguous (q, k, v) in Hugging Face order."""
    ng, per, hn = shape.num_query_groups, shape.heads_per_group, shape.head_dim
    if tuple(qkv.shape) != (shape.qkv_rows, shape.hidden_size):
        raise ShapeMismatchError(
            f"linear_qkv.weight has shape {tuple(qkv.shape)}, expected "
            f"{(shape.qkv_rows, shape.hidden_size)} for {shape.num_heads} heads, "
            f"{ng} query groups, head dim {hn}"
        )
    grouped = qkv.reshape(ng, per + 2, hn, shape.hidden_size)
    q = grouped[:, :per].reshape(ng * per * hn, shape.hidden_size).contiguous()
    k = grouped[:, per].reshape(ng * hn, shape.hidden_size).contiguous()
    v = grouped[:, per + 1].reshape(ng * hn, shape.hidden_size).contiguous()
    return q, k, v


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    """Inverse of ``split_qkv``."""
    ng, per, hn, h = shape.num_query_groups, shape.heads_per_group, shape.head_dim, shape.hidden_size
    grouped = torch.cat(
        [q.reshape(ng, per, hn, h), k.reshape(ng, 1, hn, h), v.reshape(ng, 1, hn, h)], dim=1
    )
    return grouped.reshape(shape.qkv_rows, h).contiguous()


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


def _layer_suffixes(shape: ModelShape) -> List[Tuple[str, Tuple[int, ...]]]:
    h = shape.hidden_size
    out = [
        ("input_layernorm.weight", (h,)),
        ("self_attention.linear_qkv.weight", (shape.qkv_rows, h)),
        ("self_attention.linear_proj.weight", (h, shape.num_heads * shape.head_dim)),
    ]
    if shape.qk_layernorm:
        out += [
            ("self_attention.q_layernorm.weight", (shape.head_dim,)),
            ("self_attention.k_layernorm.weight", (shape.head_dim,)),
        ]
    out += [
        ("pre_mlp_layernorm.weight", (h,)),
        ("mlp.router.weight", (shape.num_experts, h)),
    ]
    return out


def expert_name(layer: int, expert: int, fc: int) -> str:
    return f"decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc{fc}.weight"


def megatron_layer_tensors(shape: ModelShape, layer: int) -> List[MegatronTensor]:
    """What the exporter reads for layer ``layer``: attention, norms, router, every expert."""
    tensors = [
        MegatronTensor(f"decoder.layers.{layer}.{suffix}", shp, layer=layer)
        for suffix, shp in _layer_suffixes(shape)
    ]
    h, ffn = shape.hidden_size, shape.ffn_hidden_size
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
        for suffix, shp in _layer_suffixes(shape):
            out[f"decoder.layers.{i}.{suffix}"] = shp
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
        out = []
        for alias in _LAYER_ALIASES.get(suffix, (suffix,)):
            for prefix, index, axes in prefixes:
                out.append(Candidate(prefix + alias, index, axes, t.shape))
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


def hf_layer_names(arch: str, layer: int, qk_layernorm: bool) -> Dict[str, str]:
    p = f"model.layers.{layer}."
    names = {
        "input_layernorm": p + "input_layernorm.weight",
        "q": p + "self_attn.q_proj.weight",
        "k": p + "self_attn.k_proj.weight",
        "v": p + "self_attn.v_proj.weight",
        "o": p + "self_attn.o_proj.weight",
        "post_attention_layernorm": p + "post_attention_layernorm.weight",
        "router": hf_moe_prefix(arch, layer) + "gate.weight",
    }
    if qk_layernorm:
        names["q_norm"] = p + "self_attn.q_norm.weight"
        names["k_norm"] = p + "self_attn.k_norm.weight"
    return names


def hf_expected_shapes(shape: ModelShape) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of the hub-format checkpoint with its shape, in writing order."""
    h, hn, ffn = shape.hidden_size, shape.head_dim, shape.ffn_hidden_size
    out = {"model.embed_tokens.weight": (shape.vocab_size, h)}
    for i in range(shape.num_layers):
        n = hf_layer_names(shape.architecture, i, shape.qk_layernorm)
        out[n["input_layernorm"]] = (h,)
        out[n["q"]] = (shape.num_heads * hn, h)
        out[n["k"]] = (shape.num_query_groups * hn, h)
        out[n["v"]] = (shape.num_query_groups * hn, h)
        out[n["o"]] = (h, shape.num_heads * hn)
        if shape.qk_layernorm:
            out[n["q_norm"]] = (hn,)
            out[n["k_norm"]] = (hn,)
        out[n["post_attention_layernorm"]] = (h,)
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
        n = hf_layer_names(arch, i, shape.qk_layernorm)
        yield n["input_layernorm"], loaded.pop(p + "input_layernorm.weight")
        q, k, v = split_qkv(loaded.pop(p + "self_attention.linear_qkv.weight"), shape)
        yield n["q"], q
        yield n["k"], k
        yield n["v"], v
        yield n["o"], loaded.pop(p + "self_attention.linear_proj.weight")
        if shape.qk_layernorm:
            yield n["q_norm"], loaded.pop(p + "self_attention.q_layernorm.weight")
            yield n["k_norm"], loaded.pop(p + "self_attention.k_layernorm.weight")
        yield n["post_attention_layernorm"], loaded.pop(p + "pre_mlp_layernorm.weight")
        yield n["router"], loaded.pop(p + "mlp.router.weight")
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
    n = hf_layer_names(shape.architecture, layer, shape.qk_layernorm)
    p = f"decoder.layers.{layer}."
    out = {
        p + "input_layernorm.weight": get(n["input_layernorm"]),
        p + "self_attention.linear_qkv.weight": merge_qkv(get(n["q"]), get(n["k"]), get(n["v"]), shape),
        p + "self_attention.linear_proj.weight": get(n["o"]),
        p + "pre_mlp_layernorm.weight": get(n["post_attention_layernorm"]),
        p + "mlp.router.weight": get(n["router"]),
    }
    if shape.qk_layernorm:
        out[p + "self_attention.q_layernorm.weight"] = get(n["q_norm"])
        out[p + "self_attention.k_layernorm.weight"] = get(n["k_norm"])
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
