"""The run's tokenizer as a Hugging Face tokenizer (``tokenizer.json``) in an exported directory.

A run whose ``data.tokenizer_model`` is already a Hugging Face tokenizer directory (an imported
pretrained model's) is written back with ``save_pretrained`` as loaded from that directory
(``save_hf_tokenizer`` / ``special_token_ids`` dispatch on ``data.tokenizer.resolve_tokenizer``).
The rest of this module is about the project's own sentencepiece models.

``AutoTokenizer.from_pretrained(dir)`` must give the ids the model was trained on and decode them
back to the exact text. The sentencepiece models from ``tools/train_tokenizer.py`` use the identity
normaliser, no dummy prefix and byte fallback; this module rebuilds the same segmentation with the
``tokenizers`` library instead of going through a slow ``LlamaTokenizer``, whose defaults (dummy
prefix ``"▁"``, added BOS, legacy whitespace handling) would change the ids:

* model: BPE with the sentencepiece pieces as vocabulary and merges ordered by piece score (the
  order sentencepiece merges in), or Unigram with the piece scores; byte fallback on;
* normaliser: none for the identity rule (a ``Precompiled`` charsmap otherwise), plus the
  whitespace collapsing of ``remove_extra_whitespaces`` only when the model asks for it;
* pre-tokeniser: ``Metaspace`` without splitting (sentencepiece does not pre-split either, which is
  what lets whitespace-only pieces like "▁▁▁▁" survive) and with a prefix only for a dummy-prefix
  model;
* decoder: "▁" -> " ", byte pieces -> bytes -> UTF-8;
* special tokens: the control pieces (<s>, </s>, <pad>) and <unk> are special; they are never
  matched inside text (``split_special_tokens``), as sentencepiece never matches them either, so
  text containing "<s>" tokenises as characters;
* no BOS/EOS is added: pretraining documents are the text followed by EOD, nothing before.

One character stays lossy, as in sentencepiece itself: a literal U+2581 ("▁") in the input is the
space marker and decodes to " ". The Megatron-side ``SentencePieceTokenizer`` escapes it to byte
pieces; a transformers tokenizer has no hook for that, so the exported tokenizer does not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Tuple, Union

from megatron_elastic.convert import ConversionError

# sentencepiece ModelProto.SentencePiece.Type values
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _load_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError subclasses
        raise ConversionError(f"{path} is not a sentencepiece model: {exc}") from exc
    return proto


def resolve(path: Union[str, Path]) -> Tuple[str, Path]:
    """``data.tokenizer.resolve_tokenizer`` with its errors as ``ConversionError`` (exit 2)."""
    from megatron_elastic.data.tokenizer import resolve_tokenizer

    try:
        return resolve_tokenizer(path)
    except (FileNotFoundError, ValueError) as exc:
        raise ConversionError(str(exc)) from None


def _load_hf_dir(directory: Path):
    """The project's loader for a Hugging Face tokenizer directory (it checks for an EOS)."""
    from megatron_elastic.data.huggingface_tokenizer import HuggingFaceTokenizer

    try:
        return HuggingFaceTokenizer(directory)
    except (FileNotFoundError, ValueError) as exc:
        raise ConversionError(str(exc)) from None


def _hf_special_token_ids(tokenizer) -> dict:
    """The ids config.json records, as the Hugging Face tokenizer itself defines them (its pad
    may be its EOS; the Megatron side's ``pad`` hides that only from the dataset code)."""
    hf = tokenizer.hf_tokenizer
    return {"unk": hf.unk_token_id, "bos": hf.bos_token_id, "eos": hf.eos_token_id,
            "pad": hf.pad_token_id, "vocab_size": tokenizer.vocab_size}


def special_token_ids(model_path: Union[str, Path]) -> dict:
    """unk/bos/eos/pad ids (None where the tokenizer has no such token) and the vocabulary size,
    for a sentencepiece model or a Hugging Face tokenizer directory."""
    import sentencepiece as spm

    kind, model_path = resolve(model_path)
    if kind == "huggingface":
        return _hf_special_token_ids(_load_hf_dir(model_path))
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_path))
    except (RuntimeError, OSError):
        raise ConversionError(
            f"{model_path} is not a sentencepiece model: pass --tokenizer-model with the .model "
            "file or a Hugging Face tokenizer directory (with tokenizer.json)"
        ) from None

    def _id(value: int) -> Optional[int]:
        return value if value >= 0 else None

    return {
        "unk": _id(sp.unk_id()),
        "bos": _id(sp.bos_id()),
        "eos": _id(sp.eos_id()),
        "pad": _id(sp.pad_id()),
        "vocab_size": sp.get_piece_size(),
    }


def build_hf_tokenizer(model_path: Union[str, Path], model_max_length: Optional[int] = None):
    """A ``PreTrainedTokenizerFast`` equivalent to the sentencepiece model at ``model_path``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    model_path = Path(model_path)
    if not model_path.is_file():
        raise ConversionError(f"tokenizer model {model_path} does not exist")
    proto = _load_proto(model_path)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score) for p in proto.pieces]
    byte_fallback = bool(trainer.byte_fallback)
    if trainer.model_type == 2:  # BPE
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        # Merge priority = score of the merged piece, highest first: sentencepiece's BPE order.
        merges = generate_merges(vocab, pieces)
        model = BPE(vocab, merges, unk_token=trainer.unk_piece, fuse_unk=True, byte_fallback=byte_fallback)
    elif trainer.model_type == 1:  # Unigram
        model = Unigram(pieces, unk_id=trainer.unk_id, byte_fallback=byte_fallback)
    else:
        raise ConversionError(
            f"{model_path}: sentencepiece model type {trainer.model_type} (word/char) has no "
            "transformers equivalent; use a BPE or unigram model (tools/train_tokenizer.py)"
        )
    tok = Tokenizer(model)
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    prefix = bool(norm.add_dummy_prefix)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
    )
    decode_steps = [decoders.Replace("\u2581", " ")]
    if byte_fallback:
        decode_steps += [decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        decode_steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(decode_steps)
    specials = [AddedToken(p.piece, normalized=False, special=True)
                for p in proto.pieces if p.type in (_UNKNOWN, _CONTROL)]
    user = [AddedToken(p.piece, normalized=False, special=False)
            for p in proto.pieces if p.type == _USER_DEFINED]
    tok.add_special_tokens(specials)
    if user:
        tok.add_tokens(user)

    def piece(idx: int) -> Optional[str]:
        return proto.pieces[idx].piece if 0 <= idx < len(proto.pieces) else None

    kwargs = {}
    if model_max_length:
        kwargs["model_max_length"] = model_max_length
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=piece(trainer.unk_id),
        bos_token=piece(trainer.bos_id),
        eos_token=piece(trainer.eos_id),
        pad_token=piece(trainer.pad_id),
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        add_bos_token=False,
        add_eos_token=False,
        **kwargs,
    )


def _portable_tokenizer_config(out_dir: Path) -> None:
    """transformers 5 records its own backend class name ("TokenizersBackend"); the generic
    fast-tokenizer name loads the same tokenizer.json in transformers 4 and 5 alike. A specific
    class (Qwen2Tokenizer, ...) is left as the tokenizer's authors wrote it."""
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") in (None, "TokenizersBackend"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config.pop("backend", None)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def save_hf_tokenizer(
    model_path: Union[str, Path], out_dir: Union[str, Path], model_max_length: Optional[int] = None
) -> dict:
    """Write tokenizer.json + tokenizer_config.json (and a copy of the .model) into ``out_dir``;
    return ``special_token_ids``.

    A Hugging Face tokenizer directory is written with ``save_pretrained`` as it is (its own
    ``model_max_length`` included: a pretrained tokenizer knows its model's context). A
    sentencepiece file is converted and kept as ``tokenizer.model`` so the directory can be
    converted back to a training setup (``tools/convert_from_hf.py`` points
    ``data.tokenizer_model`` at it) and so tools that prefer the sentencepiece file (llama.cpp's
    converter) find it.
    """
    out_dir = Path(out_dir)
    kind, model_path = resolve(model_path)
    if kind == "huggingface":
        tokenizer = _load_hf_dir(model_path)
        tokenizer.save_pretrained(out_dir)
        _portable_tokenizer_config(out_dir)
        return _hf_special_token_ids(tokenizer)
    tokenizer = build_hf_tokenizer(model_path, model_max_length)
    tokenizer.save_pretrained(str(out_dir))
    _portable_tokenizer_config(out_dir)
    shutil.copyfile(model_path, out_dir / "tokenizer.model")
    return special_token_ids(model_path)
