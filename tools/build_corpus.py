#!/usr/bin/env python
"""Build a small jsonl text corpus from the Python standard library's source files.

Why the stdlib: it is real, varied text (code, docstrings, comments, some non-ASCII) that is
already on every machine with Python, so tokenizer training and preprocessing can be exercised and
tested with no network access and no data set to download.

Each ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` becomes one document,
``{"text": <file contents>, "path": <path relative to the stdlib root>}``. Files are read as raw
bytes and decoded as strict UTF-8, so line endings and every other character are kept exactly;
files that are not valid UTF-8 (a few deliberately mis-encoded test fixtures) are skipped and
counted. Third-party packages installed under the stdlib directory (``site-packages``,
``dist-packages``) are excluded: they vary from machine to machine.

Determinism: paths are sorted, then (only with ``--seed``) shuffled with ``random.Random(seed)``;
``--max-docs``/``--max-bytes`` then take a prefix of that order. The same Python installation and
arguments therefore always give a byte-identical file. The output is written to a temporary name
and renamed into place, so an interrupted run never leaves a truncated corpus behind.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import sysconfig
from pathlib import Path
from typing import List, Optional, Sequence

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
) -> dict:
    """Write the corpus to ``output`` and return a summary dict.

    ``max_bytes`` bounds the total UTF-8 size of the documents' text; the corpus ends at the first
    document that would cross it (a prefix, so that raising the bound only ever appends).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: the limits leave no documents.
    """
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"source directory not found: {root}")
    files = list_source_files(root)
    if seed is not None:
        random.Random(seed).shuffle(files)

    output = Path(output)
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
            raise ValueError(
                f"no documents written from {root}: {len(files)} candidate files, "
                f"--max-docs={max_docs}, --max-bytes={max_bytes} (the first document may be "
                "larger than --max-bytes; raise it)"
            )
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)

    return {
        "output": str(output),
        "root": str(root),
        "candidates": len(files),
        "documents": docs,
        "text_bytes": total_bytes,
        "skipped_undecodable": skipped_undecodable,
        "skipped_empty": skipped_empty,
        "seed": seed,
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build a jsonl corpus (one document per stdlib *.py file) with no network.",
    )
    parser.add_argument("--output", type=Path, required=True, help="jsonl file to write")
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="directory to read *.py files from "
        f"(default: this interpreter's stdlib, {stdlib_root()})",
    )
    parser.add_argument("--max-docs", type=int, default=None, help="stop after N documents")
    parser.add_argument(
        "--max-bytes", type=int, default=None, help="stop before the text exceeds N UTF-8 bytes"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="shuffle the sorted file list with this seed before applying the limits "
        "(default: keep sorted order)",
    )
    args = parser.parse_args(argv)
    for name in ("max_docs", "max_bytes"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        summary = build_corpus(args.output, args.root, args.max_docs, args.max_bytes, args.seed)
    except (FileNotFoundError, ValueError) as error:
        print(f"build_corpus.py: error: {error}", file=sys.stderr)
        return 1
    print(
        f"wrote {summary['documents']} documents ({summary['text_bytes']:,} bytes of text) from "
        f"{summary['root']} to {summary['output']}"
    )
    print(
        f"  candidates={summary['candidates']} seed={summary['seed']} "
        f"skipped: not UTF-8={summary['skipped_undecodable']} empty={summary['skipped_empty']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
