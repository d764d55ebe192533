"""Tokenize jsonl or plain-text documents into Megatron's indexed format (``.bin`` + ``.idx``).

The output is what ``megatron.core.datasets.indexed_dataset.IndexedDataset(prefix)`` and hence
``GPTDataset`` read: it is written with megatron-core's own ``IndexedDatasetBuilder``, one sequence
per document, token dtype ``DType.optimal_dtype(vocab_size)`` (uint16 below 65500 ids, else
int32), and the tokenizer's end-of-document id appended to each document unless ``append_eod``
is off. Files are named as Megatron-LM's ``tools/preprocess_data.py`` names them,
``{output_prefix}_{json_key}_document.bin/.idx``, so existing ``--data-path`` habits carry over.

Inputs are read by ``megatron_elastic.data.documents`` (jsonl or text, errors with file and line);
empty documents are skipped and counted.

Determinism: lines are grouped into chunks that are tokenized by ``workers`` processes and
written strictly in input order, so the output bytes do not depend on the worker count. At most a
few chunks per worker are in flight, so memory stays flat however large the input is.

Atomicity: data goes to temporary files next to the output that are renamed into place only after
the index is finalized; on any error they are deleted, so a failed run leaves no ``.bin``/``.idx``.

Vocabulary record: ``{prefix}.meta.json`` beside the ``.idx`` holds the largest token id written,
the tokenizer's size, path and hash (of the ``.model``, or of a Hugging Face directory's
``tokenizer.json``), and the data files' sizes (``megatron_elastic.data.meta``);
the trainer reads it before the first step. Command line: ``tools/preprocess_data.py``.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy
from tqdm import tqdm

from megatron_elastic.data.documents import Chunk, DataError, check_inputs, read_chunks
from megatron_elastic.data.meta import write_meta

with warnings.catch_warnings():
    # megatron.core's package import announces CPU fallbacks; irrelevant to preprocessing.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_elastic.data.tokenizer import load_tokenizer


@dataclass(frozen=True)
class EncodedChunk:
    tokens: numpy.ndarray  # all documents of the chunk, concatenated
    lengths: List[int]  # tokens per document
    empty: int  # documents skipped because their text is empty
    blank_lines: int
    nbytes: int  # input bytes consumed, for the progress bar


def output_prefix_for(output_prefix: str, json_key: str) -> str:
    return f"{output_prefix}_{json_key}_document"


# Per-process state, set by init_worker (in each pool worker, or in-process for workers=1).
_STATE: dict = {}


def init_worker(model_path: str, json_key: str, append_eod: bool, dtype: type) -> None:
    _STATE.update(
        tokenizer=load_tokenizer(model_path),
        json_key=json_key,
        append_eod=append_eod,
        dtype=dtype,
    )


def encode_chunk(chunk: Chunk) -> EncodedChunk:
    tokenizer = _STATE["tokenizer"]
    docs: List[List[int]] = []
    empty = blank = 0
    for text in chunk.documents(_STATE["json_key"]):
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
    chunks: Iterator[Chunk], workers: int, init_args: tuple, initializer=None, encode=None,
) -> Iterator[EncodedChunk]:
    """Encode chunks with ``workers`` processes, yielding results in input order.

    ``initializer(*init_args)`` sets up each worker and ``encode(chunk)`` encodes one chunk
    (default: this module's document encoder; the chat encoder passes its own).
    A bounded window of ``apply_async`` calls instead of ``Pool.imap``: imap's feeder thread
    reads the whole input into the task queue up front, this keeps ``4 * workers`` chunks in
    flight. Order, and therefore the output, is the same as a single-process run.
    """
    initializer = initializer or init_worker
    encode = encode or encode_chunk
    if workers == 1:
        initializer(*init_args)
        yield from map(encode, chunks)
        return
    with multiprocessing.Pool(workers, initializer=initializer, initargs=init_args) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(encode, (chunk,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def preprocess(
    inputs: Sequence[Path],
    tokenizer_model: Path,
    output_prefix: str,
    *,
    input_format: str = "auto",
    json_key: str = "text",
    append_eod: bool = True,
    workers: int = 1,
    chunk_lines: int = 256,
    progress: Optional[bool] = None,
) -> dict:
    """Write ``{output_prefix}_{json_key}_document.bin/.idx`` and ``.meta.json``; return a summary.

    ``progress`` None shows a bar only when stderr is a terminal.

    Raises:
        DataError: a missing or malformed input, or no non-empty documents.
        FileNotFoundError, ValueError: the tokenizer (a sentencepiece .model or a Hugging Face
            tokenizer directory) is missing or unusable.
    """
    inputs = [Path(path) for path in inputs]
    check_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_model)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)

    prefix = output_prefix_for(str(output_prefix), json_key)
    bin_path, idx_path = Path(prefix + ".bin"), Path(prefix + ".idx")
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin = bin_path.with_name(f".{bin_path.name}.tmp-{os.getpid()}")
    tmp_idx = idx_path.with_name(f".{idx_path.name}.tmp-{os.getpid()}")

    documents = tokens = empty = blank = 0
    max_token_id = -1
    started = time.perf_counter()
    total_bytes = sum(path.stat().st_size for path in inputs)
    init_args = (str(tokenizer_model), json_key, append_eod, dtype)
    builder: Optional[IndexedDatasetBuilder] = None
    chunks = read_chunks(inputs, input_format, chunk_lines)
    encoded_chunks = encode_in_order(chunks, workers, init_args)
    try:
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        with tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            desc="tokenizing",
            disable=None if progress is None else not progress,
        ) as bar:
            for encoded in encoded_chunks:
                start = 0
                for length in encoded.lengths:
                    builder.add_document(encoded.tokens[start : start + length], [length])
                    start += length
                documents += len(encoded.lengths)
                tokens += int(encoded.tokens.size)
                if encoded.tokens.size:
                    max_token_id = max(max_token_id, int(encoded.tokens.max()))
                empty += encoded.empty
                blank += encoded.blank_lines
                bar.update(encoded.nbytes)
        builder.finalize(str(tmp_idx))
        if documents == 0:
            raise DataError(
                f"no non-empty documents in {', '.join(map(str, inputs))} "
                f"({empty} empty skipped); check --input-format and --json-key"
            )
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
        meta = write_meta(
            prefix, max_token_id=max_token_id, vocab_size=tokenizer.vocab_size,
            tokenizer_model=str(tokenizer_model),
            tokenizer_sha256=tokenizer.unique_identifiers["model_sha256"],
            documents=documents, tokens=tokens, bin_path=bin_path, idx_path=idx_path,
        )
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
        "meta": str(meta),
        "max_token_id": max_token_id,
        "documents": documents,
        "tokens": tokens,
        "empty_skipped": empty,
        "blank_lines": blank,
        "dtype": numpy.dtype(dtype).name,
        "vocab_size": tokenizer.vocab_size,
        "eod": tokenizer.eod if append_eod else None,
        "workers": workers,
        "seconds": time.perf_counter() - started,
        "input_bytes": total_bytes,
    }
