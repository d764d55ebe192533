"""Chat jsonl -> Megatron indexed datasets: the tokens, and the loss mask with the same boundaries.

Each conversation (``megatron_elastic.data.chat``) becomes one document of
``{output_prefix}_chat_document.bin/.idx`` (token ids as the chat template renders it, no EOD
appended: the template's end-of-turn token ends it) and one document of
``{output_prefix}_chat_document.loss_mask.bin/.idx`` (uint8, 1 on the assistant turns' tokens),
both written with megatron-core's ``IndexedDatasetBuilder``. The ``.meta.json`` record
(``data/meta.py``) says ``"dataset_type": "chat"`` and adds the mask files' sizes, the chat
template's hash and source, and the number of assistant tokens.

The guarantees of ``data/preprocess.py`` hold: the same jsonl reader and its errors (file:line),
``workers`` processes whose output bytes do not depend on their number, and atomic output (all
four data files are renamed into place only after both indexes are finalized; nothing is left
behind on an error).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy
from tqdm import tqdm

from megatron_elastic.data.chat import conversation_from_record, encode_conversation, load_chat_template
from megatron_elastic.data.chat_dataset import CHAT, mask_prefix
from megatron_elastic.data.documents import Chunk, DataError, check_inputs, read_chunks
from megatron_elastic.data.meta import write_meta
from megatron_elastic.data.preprocess import DType, IndexedDatasetBuilder, encode_in_order, load_tokenizer

MASK_DTYPE = numpy.uint8


def chat_output_prefix(output_prefix: str) -> str:
    return f"{output_prefix}_chat_document"


@dataclass(frozen=True)
class EncodedChats:
    tokens: numpy.ndarray  # every conversation of the chunk, concatenated
    mask: numpy.ndarray  # uint8, aligned with tokens
    lengths: List[int]
    blank_lines: int
    nbytes: int


_STATE: dict = {}


def init_chat_worker(tokenizer_model: str, template_file: Optional[str], dtype: type) -> None:
    tokenizer = load_tokenizer(tokenizer_model)
    _STATE.update(tokenizer=tokenizer, dtype=dtype,
                  template=load_chat_template(tokenizer, Path(template_file) if template_file else None))


def encode_chat_chunk(chunk: Chunk) -> EncodedChats:
    ids: List[int] = []
    mask: List[int] = []
    lengths: List[int] = []
    blank = 0
    for where, record in chunk.records():
        if record is None:
            blank += 1
            continue
        messages = conversation_from_record(record, where)
        conv_ids, conv_mask = encode_conversation(_STATE["tokenizer"], _STATE["template"], messages, where)
        ids += conv_ids
        mask += conv_mask
        lengths.append(len(conv_ids))
    return EncodedChats(numpy.asarray(ids, dtype=_STATE["dtype"]), numpy.asarray(mask, dtype=MASK_DTYPE),
                        lengths, blank, sum(len(raw) for raw in chunk.lines))


def preprocess_chat(
    inputs: Sequence[Path],
    tokenizer_model: Path,
    output_prefix: str,
    *,
    chat_template: Optional[Path] = None,
    input_format: str = "auto",
    workers: int = 1,
    chunk_lines: int = 256,
    progress: Optional[bool] = None,
) -> dict:
    """Write the chat token and loss-mask datasets and ``.meta.json``; return a summary.

    Raises:
        DataError: a missing or malformed input or template, or no conversations.
        FileNotFoundError, ValueError: the tokenizer is missing or unusable.
    """
    inputs = [Path(path) for path in inputs]
    check_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_model)
    template = load_chat_template(tokenizer, chat_template)  # fails here, before any worker starts
    dtype = DType.optimal_dtype(tokenizer.vocab_size)

    prefix = chat_output_prefix(str(output_prefix))
    mprefix = mask_prefix(prefix)
    finals = [Path(prefix + ".bin"), Path(prefix + ".idx"), Path(mprefix + ".bin"), Path(mprefix + ".idx")]
    finals[0].parent.mkdir(parents=True, exist_ok=True)
    temps = [p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in finals]

    lengths: List[int] = []
    tokens = assistant = blank = 0
    max_token_id = -1
    started = time.perf_counter()
    total_bytes = sum(path.stat().st_size for path in inputs)
    init_args = (str(tokenizer_model), str(chat_template) if chat_template else None, dtype)
    builders: List[IndexedDatasetBuilder] = []
    encoded_chunks = encode_in_order(read_chunks(inputs, input_format, chunk_lines), workers, init_args,
                                     initializer=init_chat_worker, encode=encode_chat_chunk)
    try:
        builders = [IndexedDatasetBuilder(str(temps[0]), dtype=dtype),
                    IndexedDatasetBuilder(str(temps[2]), dtype=MASK_DTYPE)]
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing chats",
                  disable=None if progress is None else not progress) as bar:
            for encoded in encoded_chunks:
                start = 0
                for length in encoded.lengths:
                    builders[0].add_document(encoded.tokens[start:start + length], [length])
                    builders[1].add_document(encoded.mask[start:start + length], [length])
                    start += length
                lengths += encoded.lengths
                tokens += int(encoded.tokens.size)
                assistant += int(encoded.mask.sum())
                if encoded.tokens.size:
                    max_token_id = max(max_token_id, int(encoded.tokens.max()))
                blank += encoded.blank_lines
                bar.update(encoded.nbytes)
        builders[0].finalize(str(temps[1]))
        builders[1].finalize(str(temps[3]))
        if not lengths:
            raise DataError(f"no conversations in {', '.join(map(str, inputs))}: each jsonl line needs "
                            "'messages' or 'prompt'/'response'")
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
        meta = write_meta(
            prefix, max_token_id=max_token_id, vocab_size=tokenizer.vocab_size,
            tokenizer_model=str(tokenizer_model),
            tokenizer_sha256=tokenizer.unique_identifiers["model_sha256"],
            documents=len(lengths), tokens=tokens, bin_path=finals[0], idx_path=finals[1],
            extra={"dataset_type": CHAT, "assistant_tokens": assistant,
                   "loss_mask_bin_bytes": finals[2].stat().st_size,
                   "loss_mask_idx_bytes": finals[3].stat().st_size,
                   "chat_template": template.source, "chat_template_sha256": template.sha256},
        )
    finally:
        encoded_chunks.close()
        for builder in builders:
            builder.data_file.close()
        for tmp in temps:
            tmp.unlink(missing_ok=True)

    quantiles = numpy.percentile(numpy.asarray(lengths), [50, 90, 99]).round().astype(int).tolist()
    return {
        "prefix": prefix, "mask_prefix": mprefix, "meta": str(meta),
        "conversations": len(lengths), "tokens": tokens, "assistant_tokens": assistant,
        "blank_lines": blank, "max_token_id": max_token_id,
        "length_p50_p90_p99_max": quantiles + [max(lengths)],
        "dtype": numpy.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
        "chat_template": template.source, "workers": workers,
        "seconds": time.perf_counter() - started,
    }
