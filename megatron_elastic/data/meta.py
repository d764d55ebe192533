"""What a dataset's token ids need from the model: the ``<prefix>.meta.json`` sidecar.

``tools/preprocess_data.py`` writes ``<prefix>.meta.json`` beside ``<prefix>.bin/.idx`` with the
largest token id it wrote, the tokenizer's size, path and content hash (of the sentencepiece
``.model``, or of a Hugging Face directory's ``tokenizer.json``), and the sizes of the two data
files. The trainer reads it before building the model: a token id at or above the model's
vocabulary would index past the embedding (an ``IndexError`` on CPU, a device-side assert on GPU,
minutes into a run). Data from other tools (Megatron-LM's own preprocessing, say) has no sidecar and gets a cheap
sampled check instead: a few thousand tokens read from the memory-mapped ``.bin`` through
megatron-core's ``IndexedDataset``. A sidecar whose recorded file sizes no longer match the data
(the data was rewritten by something else) is ignored in favour of the sampled check.

No megatron import at module level: the preprocessing tool writes the sidecar without it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

META_SUFFIX = ".meta.json"
META_FORMAT = 1
# Sampled check of data without a sidecar: this many windows of this many tokens.
SAMPLE_WINDOWS = 16
SAMPLE_TOKENS_PER_WINDOW = 256


def meta_path(prefix: str) -> Path:
    return Path(f"{prefix}{META_SUFFIX}")


def write_meta(prefix: str, *, max_token_id: int, vocab_size: int, tokenizer_model: str,
               tokenizer_sha256: str, documents: int, tokens: int,
               bin_path: Optional[Path] = None, idx_path: Optional[Path] = None,
               extra: Optional[dict] = None) -> Path:
    """Write ``<prefix>.meta.json`` atomically (temporary name + rename); ``extra`` adds fields
    (chat data records its loss-mask files and chat template there)."""
    bin_path = Path(bin_path or f"{prefix}.bin")
    idx_path = Path(idx_path or f"{prefix}.idx")
    record = {
        "format": META_FORMAT,
        "max_token_id": int(max_token_id),
        "vocab_size": int(vocab_size),
        "tokenizer_model": str(Path(tokenizer_model).resolve()),
        "tokenizer_sha256": tokenizer_sha256,
        "documents": int(documents),
        "tokens": int(tokens),
        "bin_bytes": bin_path.stat().st_size,
        "idx_bytes": idx_path.stat().st_size,
        **(extra or {}),
    }
    path = meta_path(prefix)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return path


@dataclass
class TokenRange:
    """The largest token id of a dataset, and where that number comes from."""

    prefix: str
    max_token_id: int
    source: str  # "sidecar" or "sampled"
    tokens_read: int = 0
    vocab_size: Optional[int] = None  # the preprocessing tokenizer's size (sidecar only)
    tokenizer_model: Optional[str] = None
    tokenizer_sha256: Optional[str] = None


def read_meta(prefix: str) -> Optional[dict]:
    """The sidecar of ``prefix`` if it exists, parses and still describes the data files."""
    path = meta_path(prefix)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or record.get("format") != META_FORMAT:
            return None
        if (Path(f"{prefix}.bin").stat().st_size != record["bin_bytes"]
                or Path(f"{prefix}.idx").stat().st_size != record["idx_bytes"]):
            return None  # the data was rewritten after preprocessing: do not trust the record
        int(record["max_token_id"])
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sampled_max_token_id(prefix: str, windows: int = SAMPLE_WINDOWS,
                         per_window: int = SAMPLE_TOKENS_PER_WINDOW) -> TokenRange:
    """Largest id among ``windows`` evenly spaced runs of ``per_window`` tokens (mmap'd reads)."""
    import warnings

    import numpy

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix, mmap=True)
    try:
        lengths = dataset.sequence_lengths
        n = len(lengths)
        best, read = -1, 0
        if n:
            picks = sorted({int(i) for i in numpy.linspace(0, n - 1, num=min(windows, n))})
            for i in picks:
                length = int(lengths[i])
                if length == 0:
                    continue
                take = min(per_window, length)
                # The middle of the sequence: the start is often an EOD/BOS-like special id.
                offset = (length - take) // 2
                tokens = dataset.get(i, offset=offset, length=take)
                read += int(tokens.size)
                best = max(best, int(tokens.max()))
        return TokenRange(prefix, best, "sampled", tokens_read=read)
    finally:
        del dataset


def dataset_token_range(prefix: str) -> TokenRange:
    """From the sidecar when there is a valid one, else from a sample of the ``.bin``."""
    record = read_meta(prefix)
    if record is not None:
        return TokenRange(prefix, int(record["max_token_id"]), "sidecar",
                          vocab_size=record.get("vocab_size"),
                          tokenizer_model=record.get("tokenizer_model"),
                          tokenizer_sha256=record.get("tokenizer_sha256"))
    return sampled_max_token_id(prefix)
