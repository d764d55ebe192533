"""A Hugging Face tokenizer directory as megatron-core's ``config.tokenizer``.

For pretrained Hugging Face MoEs: their tokenizer is a directory written by ``save_pretrained``
(``tokenizer.json`` + ``tokenizer_config.json``), and the ids the checkpoint was trained on are
the ones ``AutoTokenizer.from_pretrained(dir)`` gives. This class is megatron-core's own text
tokenizer (``MegatronTokenizerText`` with the ``huggingface`` library, i.e. its
``HuggingFaceTokenizer`` around ``AutoTokenizer``), built directly instead of through
``MegatronTokenizer.from_pretrained``, which wants a ``tokenizer_metadata.json`` beside the files.
It loads from the local directory only. What it changes, and why:

* ``eod``: the tokenizer's EOS token, required at load (a document separator must exist);
* ``pad``: the tokenizer's pad id only when it is a token of its own; many HF tokenizers set
  ``pad_token = eos_token``, and megatron-core's ``GPTDataset`` would then mask every EOD out of
  the loss (it warns and falls back). -1 is that fallback, and what sentencepiece models without a
  pad piece give;
* ``bos``/``unk``: -1 when absent, as for sentencepiece (megatron-core says None);
* ``unique_identifiers``: a content hash of ``tokenizer.json`` instead of the path, so dataset
  caches follow the tokenizer, not where it is stored (as for ``SentencePieceTokenizer``);
* ``encode``/``decode``: the project's names for ``tokenize``/``detokenize``; no BOS/EOS added.

Text is tokenized exactly as the HF tokenizer is configured, including its special-token
handling: a literal special-token string in a document (e.g. "<|endoftext|>") becomes that token,
as it does for ``AutoTokenizer``, and ``decode`` drops special tokens as megatron-core does. Every
other text round-trips when the tokenizer itself is lossless (byte-level BPE is).

``save_pretrained`` writes the tokenizer as stored on disk: megatron-core's wrapper aliases
special tokens in place at load (sep_token = eos_token, cls_token = bos_token, additional special
tokens reset), which changes no id but would leak into an exported ``tokenizer_config.json``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, List, Union

import numpy
from megatron.core.tokenizers.text.text_tokenizer import MegatronTokenizerText

TOKENIZER_JSON = "tokenizer.json"


class HuggingFaceTokenizer(MegatronTokenizerText):
    """A ``save_pretrained`` tokenizer directory (with ``tokenizer.json``), for training data.

    Raises:
        FileNotFoundError: the directory or its ``tokenizer.json`` does not exist.
        ValueError: the files cannot be loaded, or the tokenizer has no EOS token.
    """

    def __init__(self, directory: Union[str, Path]) -> None:
        directory = Path(directory)
        tokenizer_json = directory / TOKENIZER_JSON
        if not tokenizer_json.is_file():
            raise FileNotFoundError(
                f"Hugging Face tokenizer {directory} has no {TOKENIZER_JSON}: point at a directory "
                "written by PreTrainedTokenizerFast.save_pretrained"
            )
        try:
            # use_fast: megatron-core defaults to slow tokenizers, which need the original
            # vocabulary files; tokenizer.json is the fast tokenizer's file.
            super().__init__(str(directory), {"library": "huggingface"}, use_fast=True)
        except ValueError as exc:  # megatron-core wraps every AutoTokenizer failure in ValueError
            detail = str(exc).split("Exception:", 1)[-1].strip().splitlines()
            raise ValueError(
                f"Hugging Face tokenizer {directory} cannot be loaded ({detail[0] if detail else exc}): "
                f"replace its {TOKENIZER_JSON}/tokenizer_config.json with the ones save_pretrained writes"
            ) from None
        self._sha256 = hashlib.sha256(tokenizer_json.read_bytes()).hexdigest()
        if self.hf_tokenizer.eos_token is None:
            raise ValueError(
                f"Hugging Face tokenizer {directory} has no eos_token, so it has no end-of-document "
                "id: set one (tokenizer.eos_token = '<|endoftext|>' or the model's own, then "
                "save_pretrained) or add \"eos_token\" to its tokenizer_config.json"
            )

    @property
    def hf_tokenizer(self):
        """The ``transformers`` tokenizer megatron-core's library wrapper holds."""
        return self._tokenizer.tokenizer

    # -- conversion -------------------------------------------------------------------------------

    def encode(self, text: str) -> List[int]:
        """Token ids for ``text``; no BOS/EOS are added (preprocessing appends ``eod`` itself)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        return list(self.tokenize(text))

    def decode(self, ids: Union[Iterable[int], numpy.ndarray]) -> str:
        """Text for ``ids`` (lists, numpy arrays, tensors); special tokens decode to ""."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.detokenize([int(i) for i in ids])

    # -- special ids ------------------------------------------------------------------------------

    @property
    def eod(self) -> int:
        """End-of-document id: the tokenizer's EOS, appended after every preprocessed document."""
        return self.hf_tokenizer.eos_token_id

    @property
    def eos(self) -> int:
        return self.hf_tokenizer.eos_token_id

    @property
    def pad(self) -> int:
        """The pad id if it is a token of its own, else -1 (megatron-core's "no pad" value)."""
        pad = self.hf_tokenizer.pad_token_id
        return -1 if pad is None or pad == self.eod else pad

    @property
    def bos(self) -> int:
        bos = self.hf_tokenizer.bos_token_id
        return -1 if bos is None else bos

    @property
    def unk(self) -> int:
        unk = self.hf_tokenizer.unk_token_id
        return -1 if unk is None else unk

    @property
    def unique_identifiers(self) -> "OrderedDict[str, str]":
        """What megatron-core hashes into dataset cache names: content, not location."""
        identifiers = OrderedDict()
        identifiers["class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        identifiers["model_sha256"] = self._sha256
        identifiers["vocab_size"] = str(self.vocab_size)
        identifiers["eod"] = str(self.eod)
        return identifiers

    # -- export -----------------------------------------------------------------------------------

    def save_pretrained(self, path: Union[str, Path]) -> None:
        """Write the tokenizer as stored in ``self.path`` (see the module docstring for why not
        the loaded instance) with ``save_pretrained`` into ``path``."""
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(self.path, use_fast=True).save_pretrained(str(path))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod}, "
            f"pad={self.pad})"
        )
