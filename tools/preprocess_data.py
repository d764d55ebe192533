#!/usr/bin/env python
"""Tokenize jsonl or plain-text files into Megatron's indexed format (``.bin`` + ``.idx``).

The output is what ``megatron.core.datasets.indexed_dataset.IndexedDataset(prefix)`` and hence
``GPTDataset`` read: it is written with megatron-core's own ``IndexedDatasetBuilder``, one sequence
per document, token dtype ``DType.optimal_dtype(vocab_size)`` (uint16 below 65500 ids, else
int32), and the tokenizer's end-of-document id appended to each document unless
``--no-append-eod``. Files are named as Megatron-LM's ``tools/preprocess_data.py`` names them,
``{output_prefix}_{json_key}_document.bin/.idx``, so existing ``--data-path`` habits carry over.

Inputs: ``*.jsonl``/``*.json`` files hold one JSON object per line and the document is its
``--json-key`` string; any other file is one plain-text document. Blank jsonl lines are ignored;
empty documents are skipped and counted. Anything else malformed (invalid JSON or UTF-8, a missing
key, a non-string value) stops the run with the file and 1-based line number.

Determinism: lines are grouped into chunks that are tokenized by ``--workers`` processes and
written strictly in input order, so the output bytes do not depend on the worker count. At most a
few chunks per worker are in flight, so memory stays flat however large the input is.

Atomicity: data goes to temporary files next to the output that are renamed into place only after
the index is finalized; on any error they are deleted, so a failed run leaves no ``.bin``/``.idx``.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy  # noqa: E402
from tqdm import tqdm  # noqa: E402

with warnings.catch_warnings():
    # megatron.core's package import announces CPU fallbacks; irrelevant to preprocessing.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder  # noqa: E402

    from megatron_elastic.data.tokenizer import SentencePieceTokenizer  # noqa: E402


class DataError(ValueError):
    """Malformed input; the message names the file and line. Picklable, so workers can raise it."""


@dataclass(frozen=True)
class Chunk:
    """A unit of work: consecutive jsonl lines, or one whole text file (``first_line == 0``)."""

    path: str
    first_line: int
    lines: List[bytes]
    is_jsonl: bool


@dataclass(frozen=True)
class EncodedChunk:
    tokens: numpy.ndarray  # all documents of the chunk, concatenated
    lengths: List[int]  # tokens per document
    empty: int  # documents skipped because their text is empty
    blank_lines: int
    nbytes: int  # input bytes consumed, for the progress bar


def output_prefix_for(output_prefix: str, json_key: str) -> str:
    return f"{output_prefix}_{json_key}_document"


def is_jsonl(path: Path, requested: str) -> bool:
    if requested != "auto":
        return requested == "jsonl"
    return path.suffix in (".jsonl", ".json")


def read_chunks(paths: Sequence[Path], fmt: str, chunk_lines: int) -> Iterator[Chunk]:
    """Split the inputs into chunks lazily, in input order."""
    for path in paths:
        if not is_jsonl(path, fmt):
            yield Chunk(str(path), 0, [path.read_bytes()], is_jsonl=False)
            continue
        with open(path, "rb") as stream:
            lines: List[bytes] = []
            first_line = 1
            for lineno, line in enumerate(stream, start=1):
                lines.append(line)
                if len(lines) == chunk_lines:
                    yield Chunk(str(path), first_line, lines, is_jsonl=True)
                    lines, first_line = [], lineno + 1
            if lines:
                yield Chunk(str(path), first_line, lines, is_jsonl=True)


def document_text(raw: bytes, json_key: Optional[str], where: str) -> Optional[str]:
    """The document in one jsonl line (or text file when ``json_key`` is None); None if blank."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: not valid UTF-8: {error}") from None
    if json_key is None:
        return line
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: invalid JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if json_key not in record:
        keys = ", ".join(sorted(map(repr, record))) or "none"
        raise DataError(f"{where}: missing key {json_key!r} (keys present: {keys}; see --json-key)")
    text = record[json_key]
    if not isinstance(text, str):
        raise DataError(f"{where}: {json_key!r} is {type(text).__name__}, expected a string")
    return text


# Per-process state, set by init_worker (in each pool worker, or in-process for --workers 1).
_STATE: dict = {}


def init_worker(model_path: str, json_key: str, append_eod: bool, dtype: type) -> None:
    _STATE.update(
        tokenizer=SentencePieceTokenizer(model_path),
        json_key=json_key,
        append_eod=append_eod,
        dtype=dtype,
    )


def encode_chunk(chunk: Chunk) -> EncodedChunk:
    tokenizer: SentencePieceTokenizer = _STATE["tokenizer"]
    docs: List[List[int]] = []
    empty = blank = 0
    for offset, raw in enumerate(chunk.lines):
        if chunk.is_jsonl:
            where = f"{chunk.path}:{chunk.first_line + offset}"
            text = document_text(raw, _STATE["json_key"], where)
        else:
            text = document_text(raw, None, chunk.path)
        if text is None:
            blank += 1
            continue
        if not text:
            empty += 1
            continue
        ids = tokenizer.encode(text)
        if _STATE["append_eod"]:
            ids.append(tokenizer.eod)
        docs.append(ids)
    flat = [token for ids in docs for token in ids]
    return EncodedChunk(
        tokens=numpy.asarray(flat, dtype=_STATE["dtype"]),
        lengths=[len(ids) for ids in docs],
        empty=empty,
        blank_lines=blank,
        nbytes=sum(len(raw) for raw in chunk.lines),
    )


def encode_in_order(
    chunks: Iterator[Chunk], workers: int, init_args: tuple
) -> Iterator[EncodedChunk]:
    """Encode chunks with ``workers`` processes, yielding results in input order.

    A bounded window of ``apply_async`` calls instead of ``Pool.imap``: imap's feeder thread
    reads the whole input into the task queue up front, this keeps ``4 * workers`` chunks in
    flight. Order, and therefore the output, is the same as a single-process run.
    """
    if workers == 1:
        init_worker(*init_args)
        yield from map(encode_chunk, chunks)
        return
    with multiprocessing.Pool(workers, initializer=init_worker, initargs=init_args) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(encode_chunk, (chunk,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def preprocess(args: argparse.Namespace) -> dict:
    """Write ``{output_prefix}_{json_key}_document.bin/.idx``; return a summary dict."""
    for path in args.input:
        if not path.is_file():
            raise DataError(f"input file not found: {path}")
    tokenizer = SentencePieceTokenizer(args.tokenizer_model)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)

    prefix = output_prefix_for(str(args.output_prefix), args.json_key)
    bin_path, idx_path = Path(prefix + ".bin"), Path(prefix + ".idx")
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin = bin_path.with_name(f".{bin_path.name}.tmp-{os.getpid()}")
    tmp_idx = idx_path.with_name(f".{idx_path.name}.tmp-{os.getpid()}")

    documents = tokens = empty = blank = 0
    started = time.perf_counter()
    total_bytes = sum(path.stat().st_size for path in args.input)
    init_args = (str(args.tokenizer_model), args.json_key, args.append_eod, dtype)
    builder: Optional[IndexedDatasetBuilder] = None
    chunks = read_chunks(args.input, args.input_format, args.chunk_lines)
    encoded_chunks = encode_in_order(chunks, args.workers, init_args)
    try:
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        with tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            desc="tokenizing",
            disable=None if args.progress is None else not args.progress,
        ) as progress:
            for encoded in encoded_chunks:
                start = 0
                for length in encoded.lengths:
                    builder.add_document(encoded.tokens[start : start + length], [length])
                    start += length
                documents += len(encoded.lengths)
                tokens += int(encoded.tokens.size)
                empty += encoded.empty
                blank += encoded.blank_lines
                progress.update(encoded.nbytes)
        builder.finalize(str(tmp_idx))
        if documents == 0:
            raise DataError(
                f"no non-empty documents in {', '.join(map(str, args.input))} "
                f"({empty} empty skipped); check --input-format and --json-key"
            )
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        encoded_chunks.close()  # stops the worker pool now, not whenever it is collected
        if builder is not None:
            builder.data_file.close()  # finalize() closes it too; this covers errors before that
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)

    return {
        "prefix": prefix,
        "bin": str(bin_path),
        "idx": str(idx_path),
        "documents": documents,
        "tokens": tokens,
        "empty_skipped": empty,
        "blank_lines": blank,
        "dtype": numpy.dtype(dtype).name,
        "vocab_size": tokenizer.vocab_size,
        "eod": tokenizer.eod if args.append_eod else None,
        "workers": args.workers,
        "seconds": time.perf_counter() - started,
        "input_bytes": total_bytes,
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tokenize jsonl/text into Megatron .bin/.idx files.",
    )
    parser.add_argument(
        "--input", type=Path, nargs="+", required=True, help="jsonl or text files, in order"
    )
    parser.add_argument(
        "--input-format",
        choices=("auto", "jsonl", "text"),
        default="auto",
        help="auto: *.jsonl/*.json are jsonl (one document per line), anything else is text "
        "(one document per file) (default: %(default)s)",
    )
    parser.add_argument(
        "--json-key",
        default="text",
        help="jsonl field holding the text; also part of the output name (default: %(default)s)",
    )
    parser.add_argument(
        "--tokenizer-model", type=Path, required=True, help="sentencepiece .model file"
    )
    parser.add_argument(
        "--output-prefix",
        required=True,
        help="writes OUTPUT_PREFIX_{json_key}_document.bin and .idx",
    )
    parser.add_argument(
        "--append-eod",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="append the tokenizer's eod id to every document (default: on)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="tokenizer processes (default: %(default)s)"
    )
    parser.add_argument(
        "--chunk-lines",
        type=int,
        default=256,
        help="jsonl lines per unit of work (default: %(default)s)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: only when stderr is a terminal)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.chunk_lines < 1:
        parser.error("--chunk-lines must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        summary = preprocess(args)
    except (ValueError, FileNotFoundError) as error:  # DataError, or a model without EOS
        print(f"preprocess_data.py: error: {error}", file=sys.stderr)
        return 1
    print(
        f"wrote {summary['documents']:,} documents, {summary['tokens']:,} tokens "
        f"({summary['dtype']}, vocab_size={summary['vocab_size']}, eod={summary['eod']}) "
        f"with {summary['workers']} worker(s) in {summary['seconds']:.1f}s"
    )
    print(
        f"  skipped: {summary['empty_skipped']} empty documents, "
        f"{summary['blank_lines']} blank lines"
    )
    print(f"  {summary['bin']}\n  {summary['idx']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
