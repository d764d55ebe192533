"""Tokenizers that Megatron-core's dataset code accepts as ``config.tokenizer``; ``load_tokenizer``.

``load_tokenizer(path)`` is the one place a ``data.tokenizer_model`` / ``--tokenizer-model`` value
becomes a tokenizer: a sentencepiece ``.model`` file gives the ``SentencePieceTokenizer`` below, a
Hugging Face tokenizer directory (``tokenizer.json``, as ``save_pretrained`` writes it) gives
``megatron_elastic.data.huggingface_tokenizer.HuggingFaceTokenizer``. ``resolve_tokenizer`` says
which without loading anything (the converters use it to decide what to copy or export).

Why a wrapper instead of ``megatron.core.tokenizers.MegatronTokenizer.from_pretrained``: that path
needs a ``metadata.json`` next to the model and routes through a generic library shim; training here
only needs a handful of ids and exact, lossless text <-> ids conversion, so a small class that
subclasses ``MegatronTokenizerBase`` (the type ``GPTDatasetConfig.tokenizer`` is annotated with) is
easier to reason about. What megatron-core reads from it:

* ``GPTDatasetConfig``: ``vocab_size`` (picks the on-disk token dtype);
* ``GPTDataset``: ``eod`` (attention/loss masks, position-id resets) and ``pad`` (label padding;
  megatron-core checks that ``pad`` does not collide with ``eod``/``eos``);
* ``MegatronDataset``: ``unique_identifiers`` (JSON-serialised into the dataset cache hash).

Losslessness: models trained by ``tools/train_tokenizer.py`` use the identity normaliser, keep all
whitespace, and have byte fallback, so ``decode(encode(text)) == text`` for any string. The one
thing sentencepiece cannot represent is a literal U+2581 ("▁"), which it uses internally for a
space and decodes back to " ". ``encode`` therefore emits that character as its three UTF-8 byte
pieces, which decode to the character itself.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import numpy
import sentencepiece as spm
from megatron.core.tokenizers import MegatronTokenizerBase

# The character sentencepiece substitutes for " " inside pieces.
_SPM_SPACE = "\u2581"

SENTENCEPIECE, HUGGINGFACE = "sentencepiece", "huggingface"
HF_TOKENIZER_JSON = "tokenizer.json"
# A Hugging Face directory that ships a sentencepiece model names it so (Llama, Mixtral).
HF_SENTENCEPIECE_NAME = "tokenizer.model"


def resolve_tokenizer(path: Union[str, Path]) -> Tuple[str, Path]:
    """``(kind, path)`` for a tokenizer path: ``("sentencepiece", file)`` or ``("huggingface", dir)``.

    A directory is a Hugging Face tokenizer when it has ``tokenizer.json`` (a path to that file
    means its directory); otherwise its
    sentencepiece model (``tokenizer.model``, or its only ``*.model``) is used. Whether a file is
    really a sentencepiece model is left to the loader, which reads it.

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        ValueError: a directory with neither ``tokenizer.json`` nor one sentencepiece ``.model``.
    """
    path = Path(path)
    if path.is_file() and path.name == HF_TOKENIZER_JSON:
        return HUGGINGFACE, path.parent  # its tokenizer_config.json (EOS, ...) is beside it
    if path.is_file():
        return SENTENCEPIECE, path
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer not found: {path}: point at a sentencepiece .model file or a Hugging Face "
            f"tokenizer directory (with {HF_TOKENIZER_JSON})"
        )
    if (path / HF_TOKENIZER_JSON).is_file():
        return HUGGINGFACE, path
    if (path / HF_SENTENCEPIECE_NAME).is_file():
        return SENTENCEPIECE, path / HF_SENTENCEPIECE_NAME
    models = sorted(p for p in path.glob("*.model") if p.is_file())
    if len(models) == 1:
        return SENTENCEPIECE, models[0]
    found = f"several .model files ({', '.join(p.name for p in models)})" if models else "no .model file"
    raise ValueError(
        f"tokenizer directory {path} has no {HF_TOKENIZER_JSON} and {found}: point at the "
        f"sentencepiece .model file itself, or at a directory written by save_pretrained (with "
        f"{HF_TOKENIZER_JSON})"
    )


def load_tokenizer(path: Union[str, Path]) -> MegatronTokenizerBase:
    """The tokenizer at ``path`` (see ``resolve_tokenizer``), with the interface megatron-core
    and this project use: vocab_size, eod, pad, encode/decode, tokenize/detokenize,
    unique_identifiers (content hash in ``model_sha256``).

    Raises:
        FileNotFoundError, ValueError: as ``resolve_tokenizer`` and the tokenizer classes; each
        message is one line naming the file and the fix.
    """
    kind, resolved = resolve_tokenizer(path)
    if kind == HUGGINGFACE:
        # transformers is imported only for Hugging Face tokenizers.
        from megatron_elastic.data.huggingface_tokenizer import HuggingFaceTokenizer

        return HuggingFaceTokenizer(resolved)
    return SentencePieceTokenizer(resolved)


class SentencePieceTokenizer(MegatronTokenizerBase):
    """Lossless wrapper around a sentencepiece ``.model`` file.

    Args:
        model_path: path to the ``.model`` file written by ``tools/train_tokenizer.py``.

    Raises:
        FileNotFoundError: the model file does not exist.
        ValueError: the file is not a sentencepiece model, or the model has no EOS piece, so
            there is no end-of-document id to use.
    """

    def __init__(self, model_path: Union[str, Path]) -> None:
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {model_path}")
        super().__init__(str(model_path), config={"library": "sentencepiece"})
        self._load(model_path.read_bytes())

    def _load(self, model_proto: bytes) -> None:
        """Build the processor and derived state from the serialized model.

        Kept separate from ``__init__`` so unpickling (DataLoader workers started with ``spawn``)
        rebuilds from the bytes rather than re-reading a path that may not exist there.
        """
        self._model_proto = model_proto
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError:
            # sentencepiece only says "INTERNAL: ... ParseFromArray(...)" for any unreadable bytes.
            raise ValueError(
                f"tokenizer {self.path} is not a sentencepiece model (sentencepiece cannot parse its "
                f"{len(model_proto)} bytes): point at the .model file written by "
                "tools/train_tokenizer.py (not the .vocab), or retrain it; a Hugging Face "
                "tokenizer is given as its directory (with tokenizer.json)"
            ) from None
        if self._sp.eos_id() < 0:
            raise ValueError(
                f"sentencepiece model {self.path} has no EOS piece (eos_id=-1), so it has no "
                "end-of-document id; retrain it with tools/train_tokenizer.py, which sets eos_id"
            )
        self._sha256 = hashlib.sha256(model_proto).hexdigest()
        self._space_escape = self._byte_pieces(_SPM_SPACE.encode("utf-8"))
        self._vocab: Optional[Dict[str, int]] = None

    def _byte_pieces(self, data: bytes) -> Optional[List[int]]:
        """Ids of the byte-fallback pieces spelling ``data``; None if the model lacks them."""
        ids = []
        for byte in data:
            piece_id = self._sp.piece_to_id(f"<0x{byte:02X}>")
            if not self._sp.is_byte(piece_id):
                return None
            ids.append(piece_id)
        return ids

    # -- conversion -------------------------------------------------------------------------------

    def encode(self, text: str) -> List[int]:
        """Token ids for ``text``; no BOS/EOS are added (preprocessing appends ``eod`` itself)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        if self._space_escape is None or _SPM_SPACE not in text:
            return self._sp.encode(text)
        parts = text.split(_SPM_SPACE)
        ids = self._sp.encode(parts[0])
        for part in parts[1:]:
            ids.extend(self._space_escape)
            ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: Union[Iterable[int], numpy.ndarray]) -> str:
        """Text for ``ids``; accepts lists, numpy arrays (e.g. rows of an IndexedDataset) and
        tensors. Control ids (bos/eos/pad) decode to the empty string."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._sp.decode([int(i) for i in ids])

    def tokenize(self, text: str) -> List[int]:
        """Megatron-core's name for :meth:`encode`."""
        return self.encode(text)

    def detokenize(self, ids: Union[Iterable[int], numpy.ndarray]) -> str:
        """Megatron-core's name for :meth:`decode`."""
        return self.decode(ids)

    def apply_chat_template(self, *args, **kwargs):
        """Required by ``MegatronTokenizerBase``; a pretraining tokenizer has no chat template."""
        raise NotImplementedError(
            f"{type(self).__name__} is a pretraining tokenizer and has no chat template"
        )

    # -- vocabulary and special ids ---------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def vocab(self) -> Dict[str, int]:
        """Piece -> id (built on first use; most callers never need it)."""
        if self._vocab is None:
            self._vocab = {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}
        return self._vocab

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return {i: piece for piece, i in self.vocab.items()}

    @property
    def eod(self) -> int:
        """End-of-document id: sentencepiece's EOS, appended after every preprocessed document."""
        return self._sp.eos_id()

    @property
    def eos(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int:
        """-1 if the model was trained without a BOS piece."""
        return self._sp.bos_id()

    @property
    def pad(self) -> int:
        """-1 if the model has no PAD piece, which is also megatron-core's own fallback value."""
        return self._sp.pad_id()

    @property
    def unk(self) -> int:
        return self._sp.unk_id()

    @property
    def unique_identifiers(self) -> "OrderedDict[str, str]":
        """What megatron-core hashes into dataset cache names.

        The model's content hash rather than its path: the same model copied elsewhere (another
        node, a restarted job) must map to the same cached indices, and a model retrained in place
        must not.
        """
        identifiers = OrderedDict()
        identifiers["class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        identifiers["model_sha256"] = self._sha256
        identifiers["vocab_size"] = str(self.vocab_size)
        return identifiers

    # -- pickling ---------------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        return {"path": self.path, "library": self.library, "model_proto": self._model_proto}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self.library = state["library"]
        self._load(state["model_proto"])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod}, "
            f"pad={self.pad})"
        )
