"""Reading a Hugging Face model directory: its tokenizer's size and its safetensors weights.

``HFWeights`` memory-maps the safetensors files (sharded with an index, or one
``model.safetensors``) and reads one tensor at a time; truncated or corrupt files and missing
shards are a ``ConversionError`` naming the file. ``HFReadPlan`` locates and shape-checks every
tensor an architecture needs before anything is built (per-expert or fused expert storage,
transformers 5's renamed Mixtral modules), refuses tensors the mapping would silently drop, and
serves the per-layer reads of the import. ``check_tokenizer_fits`` refuses a tokenizer with more
pieces than the embedding has rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from megatron_elastic.convert import ConversionError, MissingTensorError, ShapeMismatchError
from megatron_elastic.convert import mapping
from megatron_elastic.convert.mapping import ModelShape

# Buffers some older exports saved; recomputed by every model, never weights.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


# ------------------------------------------------------------------------------ tokenizer
def tokenizer_sizes(hf_dir: Path) -> Dict[Path, int]:
    """Pieces of each tokenizer file in ``hf_dir`` (sentencepiece ``tokenizer.model``, and
    ``tokenizer.json`` with its added tokens); unreadable files are a ConversionError."""
    sizes: Dict[Path, int] = {}
    spm_path = Path(hf_dir) / "tokenizer.model"
    if spm_path.is_file():
        import sentencepiece as spm

        try:
            sizes[spm_path] = spm.SentencePieceProcessor(model_file=str(spm_path)).get_piece_size()
        except (RuntimeError, OSError):
            raise ConversionError(
                f"{spm_path} is not a readable sentencepiece model: replace it with the model's "
                "tokenizer.model, or remove it to import the weights without a tokenizer"
            ) from None
    json_path = Path(hf_dir) / "tokenizer.json"
    if json_path.is_file():
        try:
            from tokenizers import Tokenizer

            sizes[json_path] = Tokenizer.from_file(str(json_path)).get_vocab_size(with_added_tokens=True)
        except ImportError:
            pass
        except Exception as exc:  # the library raises plain Exception subclasses from Rust
            raise ConversionError(
                f"{json_path} is not a readable tokenizers file ({str(exc).splitlines()[0]}): "
                "replace it with the model's tokenizer.json"
            ) from None
    return sizes


def check_tokenizer_fits(hf_dir: Path, embedding_rows: int) -> None:
    """A tokenizer with more pieces than the embedding has rows would produce ids that index
    past it (a device-side assert on GPU, an IndexError on CPU) the first time they occur."""
    for path, pieces in tokenizer_sizes(hf_dir).items():
        if pieces > embedding_rows:
            raise ConversionError(
                f"{path} has {pieces} pieces but the model's embedding has {embedding_rows} rows "
                f"(vocab_size in {Path(hf_dir) / 'config.json'}): ids >= {embedding_rows} would "
                "index past it; use the tokenizer this model was trained with"
            )


# ------------------------------------------------------------------------------ weights
def _safe_open(path: Path):
    """``safetensors.safe_open`` with a truncated or corrupt file named in a ConversionError."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), "pt")
    except Exception as exc:  # SafetensorError (from Rust), OSError
        raise ConversionError(
            f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]}): the download "
            "or copy is truncated or corrupt; fetch the file again"
        ) from None


class HFWeights:
    """Lazily memory-mapped safetensors weights of an HF directory (sharded with an index, or one
    model.safetensors)."""

    def __init__(self, hf_dir: Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        self._handles = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text()).get("weight_map") or {}
            except (json.JSONDecodeError, AttributeError) as exc:
                raise ConversionError(
                    f"{index} is not a valid safetensors index ({exc}): fetch it again"
                ) from None
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise MissingTensorError(
                    f"{index} lists shard(s) {', '.join(missing)} that are not in {self.dir}: the "
                    "download or copy is incomplete"
                )
            self.file_of = dict(weight_map)
        elif single.is_file():
            with _safe_open(single) as f:
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
        fname = self.file_of[name]
        if fname not in self._handles:
            self._handles[fname] = _safe_open(self.dir / fname)
        return self._handles[fname]

    def names(self) -> List[str]:
        return list(self.file_of)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle(name).get_tensor(name)
        except ConversionError:
            raise
        except Exception as exc:  # SafetensorError: bytes missing or unreadable
            raise ConversionError(
                f"{self.dir / self.file_of[name]}: cannot read tensor '{name}' "
                f"({str(exc).splitlines()[0]}): the file is truncated or corrupt; fetch it again"
            ) from None

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
        for i in shape.moe_layers:
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
                f"convert: {', '.join(unexpected[:5])}{more}; converting would drop them (config.json "
                "describes a different architecture than the weights: shared experts, biases, dense "
                "layers?)"
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
