"""A small jsonl text corpus built from the Python standard library's source files.

Why the stdlib: it is real, varied text (code, docstrings, comments, some non-ASCII) that is
already on every machine with Python, so tokenizer training and preprocessing can be exercised and
tested with no network access and no data set to download.

Each ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` becomes one document,
``{"text": <file contents>, "path": <path relative to the stdlib root>}``. Files are read as raw
bytes and decoded as strict UTF-8, so line endings and every other character are kept exactly;
files that are not valid UTF-8 (a few deliberately mis-encoded test fixtures) are skipped and
counted. Third-party packages installed under the stdlib directory (``site-packages``,
``dist-packages``) are excluded: they vary from machine to machine.

Determinism: paths are sorted, then (only with ``seed``) shuffled with ``random.Random(seed)``;
``holdout`` splits (e.g. ``{"valid": 1_000_000}``) take whole files from the front of that order
until each reaches its byte size, written beside the output as ``<stem>.<name>.jsonl``, so a
validation set never shares a file with the training text; ``max_docs``/``max_bytes`` then take a
prefix of the rest. The same Python installation and
arguments therefore always give a byte-identical file. The output is written to a temporary name
and renamed into place, so an interrupted run never leaves a truncated corpus behind.

Standard library only (no megatron import). Command line: ``tools/build_corpus.py``.
"""

from __future__ import annotations

import json
import os
import random
import sysconfig
from pathlib import Path
from typing import Dict, List, Optional

from megatron_elastic.data.documents import DataError

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_source_files(root: Path) -> List[Path]:
    """All ``*.py`` files under ``root``, sorted by their relative POSIX path."""
    files = [
        path
        for path in root.rglob("*.py")
        if path.is_file() and not EXCLUDED_DIRS.intersection(path.relative_to(root).parts)
    ]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def build_corpus(
    output: Path,
    root: Optional[Path] = None,
    max_docs: Optional[int] = None,
    max_bytes: Optional[int] = None,
    seed: Optional[int] = None,
    holdout: Optional[Dict[str, int]] = None,
) -> dict:
    """Write the corpus to ``output`` and return a summary dict.

    ``max_bytes`` bounds the total UTF-8 size of the documents' text; the corpus ends at the first
    document that would cross it (a prefix, so that raising the bound only ever appends).

    Raises:
        DataError: ``root`` does not exist, or the limits leave no documents.
    """
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise DataError(f"source directory not found: {root}")
    files = list_source_files(root)
    if seed is not None:
        random.Random(seed).shuffle(files)
    candidates = len(files)

    output = Path(output)
    held_out = {}
    for name, size in (holdout or {}).items():
        if not name.isidentifier() or size <= 0:
            raise DataError(f"holdout split {name}={size}: give a name (letters) and a positive byte size")
        path = holdout_path(output, name)
        taken, files = _take_bytes(files, size)
        held_out[name] = _write_documents(path, taken, root, None, None)
        held_out[name]["output"] = str(path)
    summary = _write_documents(output, files, root, max_docs, max_bytes)
    summary.update(output=str(output), root=str(root), candidates=candidates, seed=seed,
                   holdout=held_out)
    return summary


def holdout_path(output: Path, name: str) -> Path:
    """``corpus.jsonl`` + ``valid`` -> ``corpus.valid.jsonl``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.{name}{output.suffix or '.jsonl'}")


def _take_bytes(files: List[Path], size: int):
    """Whole files from the front of ``files`` until their bytes reach ``size``; (taken, rest)."""
    total = 0
    for i, path in enumerate(files):
        if total >= size:
            return files[:i], files[i:]
        total += path.stat().st_size
    raise DataError(f"a holdout of {size} bytes takes every file: lower it")


def _write_documents(output: Path, files: List[Path], root: Path, max_docs, max_bytes) -> dict:
    """Write ``files`` as jsonl documents (atomically); the counts."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    docs = total_bytes = skipped_undecodable = skipped_empty = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as out:
            for path in files:
                if max_docs is not None and docs >= max_docs:
                    break
                raw = path.read_bytes()
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    skipped_undecodable += 1
                    continue
                if not text:
                    skipped_empty += 1
                    continue
                if max_bytes is not None and total_bytes + len(raw) > max_bytes:
                    break
                record = {"text": text, "path": path.relative_to(root).as_posix()}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                docs += 1
                total_bytes += len(raw)
        if docs == 0:
            raise DataError(
                f"no documents written from {root}: {len(files)} candidate files, "
                f"--max-docs={max_docs}, --max-bytes={max_bytes} (the first document may be "
                "larger than --max-bytes; raise it)"
            )
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "documents": docs,
        "text_bytes": total_bytes,
        "skipped_undecodable": skipped_undecodable,
        "skipped_empty": skipped_empty,
    }
