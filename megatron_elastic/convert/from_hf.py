"""Hugging Face Mixtral / Qwen3-MoE directory -> Megatron-core distributed checkpoint + recipe.

The import builds the project's own ``GPTModel`` (``models/gpt.build_model``) in one process with
tensor/expert parallel size 1, copies the weights in layer by layer (safetensors are memory-mapped
and read one tensor at a time), and saves it with ``training/checkpoint.save_checkpoint``. That
makes the checkpoint's keys exactly what the trainer loads, and because a ``torch_dist`` checkpoint
stores global tensors, it loads under whatever tensor/expert-parallel layout the emitted recipe
chooses (``dist_checkpointing`` reshards on load). Memory: the Megatron model once (the save is a
single collective call over the whole state) plus the source tensors of one layer.

Everything that can be wrong with the input is checked before the model is built: the
architecture, features neither Megatron recipe here expresses (sliding windows, attention biases,
dense layers, RoPE scaling), every tensor's presence and shape, and tensors the mapping would
silently drop.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from megatron_elastic.config import Config, ConfigError
from megatron_elastic.convert import ConversionError, MissingTensorError, ShapeMismatchError
from megatron_elastic.convert import mapping
from megatron_elastic.convert.mapping import ModelShape

CONFIG_NAME = "megatron_config.yaml"
# Buffers some older exports saved; recomputed by every model, never weights.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


# ------------------------------------------------------------------------------ config
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


def hf_shape(hf, arch: str) -> ModelShape:
    c = as_hf_config(hf, arch)
    heads = c.num_attention_heads
    qwen = arch == "qwen3_moe"
    return ModelShape(
        architecture=arch,
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        num_heads=heads,
        num_query_groups=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        num_experts=c.num_experts if qwen else c.num_local_experts,
        ffn_hidden_size=c.moe_intermediate_size if qwen else c.intermediate_size,
        vocab_size=c.vocab_size,
        qk_layernorm=qwen,
        tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
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
    if arch == "qwen3_moe":
        if getattr(c, "attention_bias", False):
            problems.append("attention_bias=true (the Megatron model has no linear biases)")
        if getattr(c, "mlp_only_layers", None):
            problems.append(f"mlp_only_layers={c.mlp_only_layers} (every layer must be MoE)")
        if getattr(c, "decoder_sparse_step", 1) != 1:
            problems.append(f"decoder_sparse_step={c.decoder_sparse_step} (every layer must be MoE)")
    if problems:
        raise ConversionError(f"{source}: unsupported: " + "; ".join(problems))


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
            f"{'norm_topk_prob' if arch == 'qwen3_moe' else 'the Mixtral router'}; the config was edited inconsistently"
        )
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
            "rotary_base": _rope_theta(hf, source),
            "init_method_std": float(getattr(hf, "initializer_range", 0.02)),
            "untie_embeddings_and_output_weights": not shape.tied_embeddings,
            "num_moe_experts": shape.num_experts,
            "moe_ffn_hidden_size": shape.ffn_hidden_size,
            # Qwen3-MoE's dense-MLP width: unused while every layer is MoE, kept for the round trip.
            "ffn_hidden_size": int(hf.intermediate_size) if arch == "qwen3_moe" else None,
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


# ------------------------------------------------------------------------------ weights
class HFWeights:
    """Lazily memory-mapped safetensors weights of an HF directory (sharded with an index, or one
    model.safetensors)."""

    def __init__(self, hf_dir: Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        self._handles = {}
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise MissingTensorError(
                    f"{index} lists shard(s) {', '.join(missing)} that are not in {self.dir}: the "
                    "download or copy is incomplete"
                )
            self.file_of = dict(weight_map)
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), "pt") as f:
                self.file_of = {name: single.name for name in f.keys()}
        else:
            bins = sorted(p.name for p in self.dir.glob("pytorch_model*.bin"))
            if bins:
                raise ConversionError(
                    f"{self.dir} holds PyTorch pickles ({', '.join(bins[:2])}); only safetensors are "
                    "read: re-save with model.save_pretrained(dir) (safetensors is the default)"
                )
            raise MissingTensorError(
                f"{self.dir} has no weights (no model.safetensors or model.safetensors.index.json)"
            )

    def _handle(self, name: str):
        from safetensors import safe_open

        fname = self.file_of[name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self.dir / fname), "pt")
        return self._handles[fname]

    def names(self) -> List[str]:
        return list(self.file_of)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def _alternatives(name: str, arch: str) -> List[str]:
    """Other spellings of a hub name: transformers 5 renamed Mixtral's block_sparse_moe to mlp."""
    out = [name]
    if arch == "mixtral" and ".block_sparse_moe." in name:
        out.append(name.replace(".block_sparse_moe.", ".mlp."))
    return out


class HFReadPlan:
    """Where each hub tensor is, validated up front; serves the per-layer reads of the import.

    Experts may be stored per expert (the hub format every version writes) or fused as
    transformers 5 keeps them in memory (``mlp.experts.gate_up_proj`` [E, 2I, h] and
    ``mlp.experts.down_proj`` [E, h, I]); both are read.
    """

    def __init__(self, weights: HFWeights, shape: ModelShape):
        self.weights, self.shape = weights, shape
        arch = shape.architecture
        present = set(weights.names())
        self.actual: Dict[str, str] = {}
        self.fused: Dict[int, Tuple[str, str]] = {}
        consumed = set()
        missing = []
        expected = mapping.hf_expected_shapes(shape)
        expert_names = set()
        h, ffn, E = shape.hidden_size, shape.ffn_hidden_size, shape.num_experts
        for i in range(shape.num_layers):
            for prefix in {f"model.layers.{i}.mlp.", mapping.hf_moe_prefix(arch, i)}:
                gu, down = prefix + "experts.gate_up_proj", prefix + "experts.down_proj"
                if gu in present and down in present:
                    for name, want in ((gu, (E, 2 * ffn, h)), (down, (E, h, ffn))):
                        have = weights.shape(name)
                        if have != want:
                            raise ShapeMismatchError(
                                f"shape mismatch for '{name}' in {weights.dir}: stored {have}, expected "
                                f"{want} from config.json"
                            )
                    self.fused[i] = (gu, down)
                    consumed.update((gu, down))
            for j in range(E):
                expert_names.update(mapping.hf_expert_names(arch, i, j))
        for name, want in expected.items():
            layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
            if name in expert_names and layer in self.fused:
                continue
            actual = next((alt for alt in _alternatives(name, arch) if alt in present), None)
            if actual is None:
                missing.append(name)
                continue
            have = weights.shape(actual)
            if have != want:
                raise ShapeMismatchError(
                    f"shape mismatch for '{actual}' in {weights.dir}: stored {have}, expected {want} "
                    "from config.json (check hidden_size, num_attention_heads, num_key_value_heads, "
                    "head_dim, the expert count and intermediate size, vocab_size)"
                )
            self.actual[name] = actual
            consumed.add(actual)
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise MissingTensorError(
                f"{weights.dir} is missing {len(missing)} tensor(s) the {mapping.ARCHITECTURES[arch]} "
                f"config requires: {', '.join(missing[:5])}{more}"
            )
        if shape.tied_embeddings and "lm_head.weight" in present:
            consumed.add("lm_head.weight")  # tied: transformers ignores it too
        unexpected = sorted(n for n in present - consumed if not n.endswith(_IGNORED_SUFFIXES))
        if unexpected:
            more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
            raise ConversionError(
                f"{weights.dir} has tensor(s) the {mapping.ARCHITECTURES[arch]} mapping does not "
                f"convert: {', '.join(unexpected[:5])}{more}; converting would drop them (a different "
                "architecture, e.g. shared experts or biases?)"
            )
        self._fused_cache: Optional[Tuple[int, torch.Tensor, torch.Tensor]] = None

    def get(self, name: str) -> torch.Tensor:
        return self.weights.get(self.actual[name])

    def get_expert(self, layer: int, expert: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if layer in self.fused:
            if self._fused_cache is None or self._fused_cache[0] != layer:
                self._fused_cache = None  # release the previous layer before reading the next
                gu, down = self.fused[layer]
                self._fused_cache = (layer, self.weights.get(gu), self.weights.get(down))
            _, gu_t, down_t = self._fused_cache
            ffn = self.shape.ffn_hidden_size
            return gu_t[expert, :ffn], gu_t[expert, ffn:], down_t[expert]
        gate, up, down = mapping.hf_expert_names(self.shape.architecture, layer, expert)
        return self.get(gate), self.get(up), self.get(down)

    def release(self) -> None:
        self._fused_cache = None


# ------------------------------------------------------------------------------ process state
@contextlib.contextmanager
def single_process_parallel():
    """torch.distributed + Megatron parallel state for one process with TP = EP = 1.

    Reuses an existing one-process setup (e.g. a caller that already initialised); a store in
    memory avoids picking a port.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_elastic import compat

    compat.enable()
    created_pg = False
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError(
                f"convert_from_hf runs in one process but was launched with {dist.get_world_size()}: "
                "run it without torchrun/srun; the checkpoint it writes loads under any layout"
            )
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        created_pg = True
    created_mp = False
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=1,
            pipeline_model_parallel_size=1,
            expert_model_parallel_size=1,
            create_gloo_process_groups=True,
        )
        created_mp = True
    try:
        yield
    finally:
        if created_mp:
            ps.destroy_model_parallel()
        if created_pg:
            dist.destroy_process_group()


# ------------------------------------------------------------------------------ the import
@dataclass
class ImportResult:
    output: Path
    checkpoint_dir: Path
    config_path: Path
    architecture: str
    config: Config
    num_tensors: int = 0
    seconds: float = 0.0


def _write_recipe(cfg: Config, path: Path, shown: Path, output: Path, hf_dir: Path) -> None:
    """Write the recipe to ``path``; ``shown`` is where it will live once the output is in place."""
    import yaml

    header = (
        f"# Megatron-elastic recipe for the model imported from {hf_dir}.\n"
        f"# The checkpoint at {output} holds its weights (iteration 0, no optimizer state):\n"
        "# checkpoint.finetune=true starts a fresh optimizer from them. Fill in the data, pick a save\n"
        "# directory and any elastic schedule, e.g.\n"
        f"#   python -m megatron_elastic.train --config {shown} \\\n"
        "#     data.data_path=[/path/to/corpus_text_document] checkpoint.save=/path/to/run \\\n"
        "#     elastic.schedule=layerwise elastic.k_min=1 elastic.k_max=4\n"
        "# The parallel section is the layout chosen at import; any other layout loads the same\n"
        "# checkpoint (it stores global tensors).\n"
    )
    path.write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def convert_hf_to_megatron(
    hf_dir: Union[str, os.PathLike],
    output: Union[str, os.PathLike],
    *,
    tensor_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    config_out: Union[None, str, os.PathLike] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ImportResult:
    """Write a Megatron checkpoint root at ``output`` (tracker + iter_0000000 + recipe YAML)."""
    from tqdm import tqdm

    from megatron_elastic.convert.to_hf import commit_output, prepare_output

    start = time.time()
    hf_dir, output = Path(hf_dir), Path(output)
    raw = read_hf_config(hf_dir)
    source = str(hf_dir / "config.json")
    arch = mapping.architecture_from_hf_config(raw, source)
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(hf_dir))
    tokenizer = hf_dir / "tokenizer.model"
    final_tokenizer = output / "tokenizer.model" if tokenizer.is_file() else None
    cfg = megatron_config_from_hf(hf, arch, output.resolve(), tensor_model_parallel_size,
                                  expert_model_parallel_size, final_tokenizer.resolve() if final_tokenizer else None,
                                  source)
    shape = hf_shape(hf, arch)
    weights = HFWeights(hf_dir)
    plan = HFReadPlan(weights, shape)  # every tensor located and shape-checked before building
    tmp = prepare_output(output, overwrite, protect=(hf_dir,))
    try:
        # The conversion process itself runs unsharded; the checkpoint records the chosen layout.
        build_cfg = copy.deepcopy(cfg)
        build_cfg.parallel.tensor_model_parallel_size = 1
        build_cfg.parallel.expert_model_parallel_size = 1
        build_cfg.parallel.sequence_parallel = False
        with single_process_parallel():
            from megatron_elastic.device import seed_all
            from megatron_elastic.models.gpt import build_model
            from megatron_elastic.training.checkpoint import save_checkpoint

            seed_all(cfg.train.seed)
            model = build_model(build_cfg, shape.vocab_size)
            params = {mapping.canonical_param_name(n): p for n, p in model.named_parameters()}
            expected = mapping.megatron_param_shapes(shape)
            if set(params) != set(expected):
                extra, lacking = sorted(set(params) - set(expected)), sorted(set(expected) - set(params))
                raise RuntimeError(f"internal: model parameters differ from the mapping: extra {extra[:3]}, "
                                   f"missing {lacking[:3]}")
            num = 0

            def put(name: str, value: torch.Tensor) -> None:
                nonlocal num
                param = params.pop(name)
                if tuple(value.shape) != tuple(param.shape):
                    raise ShapeMismatchError(
                        f"shape mismatch for {name}: converted {tuple(value.shape)}, model {tuple(param.shape)}"
                    )
                param.copy_(value)
                num += 1

            with torch.no_grad():
                put("embedding.word_embeddings.weight", plan.get("model.embed_tokens.weight"))
                for i in tqdm(range(shape.num_layers), desc="HF -> Megatron", unit="layer",
                              disable=not progress, dynamic_ncols=True):
                    for name, value in mapping.hf_to_megatron_layer(plan.get, plan.get_expert, shape, i).items():
                        put(name, value)
                    plan.release()
                put("decoder.final_layernorm.weight", plan.get("model.norm.weight"))
                if not shape.tied_embeddings:
                    put("output_layer.weight", plan.get("lm_head.weight"))
            if params:
                raise RuntimeError(f"internal: parameters left unset: {sorted(params)[:5]}")
            weights.close()
            save_checkpoint(tmp, model, None, cfg, 0)
            del model
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        recipe = Path(config_out) if config_out else output / CONFIG_NAME
        _write_recipe(cfg, tmp / CONFIG_NAME, recipe, output, hf_dir)
        commit_output(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if config_out:
        recipe.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(output / CONFIG_NAME, recipe)
    return ImportResult(output=output, checkpoint_dir=output / "iter_0000000", config_path=recipe,
                        architecture=arch, config=cfg, num_tensors=num, seconds=time.time() - start)
