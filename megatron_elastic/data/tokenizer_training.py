"""Training a lossless sentencepiece tokenizer (BPE or unigram) on jsonl or plain-text documents.

Why these trainer options: the model is used to tokenize source code and prose for pretraining, and
``decode(encode(text))`` must give back ``text`` exactly (checked after every training run):

* ``normalization_rule_name=identity`` -- no NFKC folding, so every code point is kept as written;
* ``remove_extra_whitespaces=False``, ``add_dummy_prefix=False`` -- runs of spaces, leading and
  trailing whitespace are not collapsed or invented;
* ``allow_whitespace_only_pieces=True`` -- indentation runs ("▁▁▁▁▁▁▁▁") become single pieces;
* ``split_digits=True`` -- numbers are spelled digit by digit, so no arbitrary number chunks;
* ``byte_fallback=True`` -- any character outside the learned vocabulary is encoded as its UTF-8
  bytes instead of ``<unk>``;
* ids ``unk=0 bos=1 eos=2 pad=3`` -- EOS is the end-of-document id Megatron needs (``.eod``), and a
  distinct PAD keeps megatron-core from warning about pad/eod collisions.

Newlines: sentencepiece's file reader treats every input line as a separate sentence, so a model
trained from files never sees "\\n". Documents are therefore fed through ``sentence_iterator`` with
their newlines intact, and "\\n" is learned like any other character (pieces such as "):\\n").
Documents longer than ``max_sentence_length`` bytes are cut at line boundaries into several
training sentences, because sentencepiece silently drops longer sentences.

Output: ``{output_prefix}.model`` (what everything loads) and ``{output_prefix}.vocab``
(informational; pieces that contain a newline span two lines of that file).

``character_coverage`` must lie in [0.98, 1]: sentencepiece refuses anything lower
(``trainer_interface.cc``: ``character_coverage() >= 0.98``). With byte fallback nothing is lost
either way: characters outside the coverage are spelled as their UTF-8 bytes.

sentencepiece's own errors are turned into :class:`DataError` messages that name the fix. No
megatron import at module level. Command line: ``tools/train_tokenizer.py``.
"""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import sentencepiece as spm

from megatron_elastic.data.documents import DataError, check_inputs, read_documents

SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}

# Text the trained model must round-trip besides the corpus sample: the characters that lossy
# tokenizer settings typically break (tabs, CR, whitespace runs, non-ASCII, sentencepiece's own
# space marker).
ROUND_TRIP_PROBE = (
    "def f(x):\n\tif x:\n        return 1234567890  \n\n\n  r\u00e9sum\u00e9 \u4e16\u754c "
    "\U0001f642\r\n \u2581x\x00 \t end"
)

# sentencepiece's own lower bound on character_coverage (checked before training).
MIN_CHARACTER_COVERAGE = 0.98


def split_for_training(text: str, max_bytes: int) -> Iterator[str]:
    """Cut ``text`` into pieces of at most ``max_bytes`` UTF-8 bytes, at line ends when possible.

    Newlines stay attached to the line they end, so they are still part of the training text.
    """
    chunk: List[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        line_bytes = len(line.encode("utf-8"))
        if size + line_bytes > max_bytes and chunk:
            yield "".join(chunk)
            chunk, size = [], 0
        while line_bytes > max_bytes:  # a single over-long line: cut it by characters
            cut = len(line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore"))
            yield line[:cut]
            line = line[cut:]
            line_bytes = len(line.encode("utf-8"))
        if line:
            chunk.append(line)
            size += line_bytes
    if chunk:
        yield "".join(chunk)


class CorpusStream:
    """Feeds training sentences to sentencepiece while counting them.

    sentencepiece turns an exception raised inside ``sentence_iterator`` into a generic
    ``RuntimeError``; the original is kept in ``error`` so the caller can re-raise it unchanged.
    """

    def __init__(
        self, paths: Sequence[Path], fmt: str, json_key: str, max_bytes: int, sample_size: int
    ):
        self.paths, self.fmt, self.json_key, self.max_bytes = paths, fmt, json_key, max_bytes
        self.documents = self.sentences = self.chars = self.empty = 0
        self.sample: List[str] = []  # the first ``sample_size`` documents, for the round trip check
        self.sample_size = sample_size
        self.error: Optional[BaseException] = None

    def __iter__(self) -> Iterator[str]:
        try:
            for text in read_documents(self.paths, self.fmt, self.json_key):
                if not text:
                    self.empty += 1
                    continue
                self.documents += 1
                self.chars += len(text)
                if len(self.sample) < self.sample_size:
                    self.sample.append(text)
                for sentence in split_for_training(text, self.max_bytes):
                    self.sentences += 1
                    yield sentence
        except BaseException as error:
            self.error = error
            raise


_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_LOW = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")
_COVERAGE = re.compile(r"character_coverage\(\) >= ([0-9.]+)")


def explain_trainer_error(error: RuntimeError, stream: CorpusStream) -> Exception:
    """Turn sentencepiece's internal error text into a message that names the fix."""
    if stream.error is not None:
        return stream.error
    if stream.sentences == 0:
        return DataError(
            f"empty corpus: no non-empty documents in {', '.join(map(str, stream.paths))} "
            f"(documents read: {stream.documents}, empty: {stream.empty}); check --input, "
            "--input-format and --json-key"
        )
    message = str(error)
    match = _TOO_HIGH.search(message)
    if match:
        return DataError(
            f"--vocab-size {match.group(1)} is too large for this corpus: sentencepiece can build "
            f"at most {match.group(2)} pieces from it. Lower --vocab-size to <= {match.group(2)} "
            "or train on more text."
        )
    match = _TOO_LOW.search(message)
    if match:
        return DataError(
            f"--vocab-size {match.group(1)} is too small: the special ids, the 256 byte-fallback "
            f"pieces and the covered characters need {match.group(2)}. Raise --vocab-size to "
            ">= that, or lower --character-coverage."
        )
    match = _COVERAGE.search(message)
    if match:
        return DataError(
            f"sentencepiece refuses this --character-coverage: it must lie in [{match.group(1)}, 1] "
            "(uncovered characters use byte fallback anyway)"
        )
    return error


def train_tokenizer(
    inputs: Sequence[Path],
    output_prefix: Path,
    *,
    input_format: str = "auto",
    json_key: str = "text",
    model_type: str = "bpe",
    vocab_size: int = 8192,
    character_coverage: float = 0.9995,
    input_sentence_size: int = 0,
    max_sentence_length: int = 16384,
    seed: int = 1234,
    num_threads: Optional[int] = None,
    verify_docs: int = 32,
    verbose: bool = False,
) -> dict:
    """Train, write ``{output_prefix}.model/.vocab``, verify the round trip; return a summary.

    Raises:
        DataError: a missing or malformed input, an empty corpus, or options the corpus or
            sentencepiece cannot satisfy (the message names the fix).
        RuntimeError: the trained model does not round-trip (a bug, not a user error).
    """
    inputs = [Path(path) for path in inputs]
    output_prefix = Path(output_prefix)
    check_inputs(inputs)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)

    stream = CorpusStream(inputs, input_format, json_key, max_sentence_length, verify_docs)
    spm.set_random_generator_seed(seed)
    model_writer = io.BytesIO()
    started = time.perf_counter()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(stream),
            model_writer=model_writer,
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=max_sentence_length,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            byte_fallback=True,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=0 if verbose else 2,
            **SPECIAL_IDS,
        )
    except RuntimeError as error:
        raise explain_trainer_error(error, stream) from None
    train_seconds = time.perf_counter() - started

    model_path = Path(f"{output_prefix}.model")
    vocab_path = Path(f"{output_prefix}.vocab")
    write_model_files(model_writer.getvalue(), model_path, vocab_path)
    tokenizer = load_tokenizer(model_path)
    failures: List[int] = []
    sample_chars = sample_tokens = 0
    for i, text in enumerate(stream.sample + [ROUND_TRIP_PROBE]):
        ids = tokenizer.encode(text)
        if tokenizer.decode(ids) != text:
            failures.append(i)
        if i < len(stream.sample):
            sample_chars, sample_tokens = sample_chars + len(text), sample_tokens + len(ids)
    if failures:
        raise RuntimeError(
            f"trained model {model_path} does not round-trip {len(failures)} of "
            f"{len(stream.sample) + 1} checked texts (indices {failures[:10]}); this is a bug"
        )
    return {
        "model": str(model_path),
        "vocab": str(vocab_path),
        "model_type": model_type,
        "vocab_size": tokenizer.vocab_size,
        "eod": tokenizer.eod,
        "bos": tokenizer.bos,
        "pad": tokenizer.pad,
        "unk": tokenizer.unk,
        "documents": stream.documents,
        "empty_documents": stream.empty,
        "sentences": stream.sentences,
        "chars": stream.chars,
        "train_seconds": train_seconds,
        "verified": len(stream.sample) + 1,
        "chars_per_token": sample_chars / sample_tokens if sample_tokens else float("nan"),
    }


def write_model_files(model_proto: bytes, model_path: Path, vocab_path: Path) -> None:
    """Write ``.model`` and a sentencepiece-format ``.vocab`` ("piece<TAB>score" per id).

    The trainer's own ``model_prefix`` output would record that prefix inside the model, so the
    same data and options trained to two different paths would give different bytes (and so
    different ``unique_identifiers`` hashes). Writing the in-memory model keeps the file a pure
    function of data and options. Both files go through a temporary name and a rename.
    """
    processor = spm.SentencePieceProcessor(model_proto=model_proto)
    vocab = "".join(
        f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n"
        for i in range(processor.get_piece_size())
    )
    for path, data in ((model_path, model_proto), (vocab_path, vocab.encode("utf-8"))):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)


def load_tokenizer(model_path: Path):
    """Imported lazily: megatron-core takes seconds to import, which ``--help`` and input errors
    should not wait for."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron_elastic.data.tokenizer import load_tokenizer as load

    return load(model_path)
