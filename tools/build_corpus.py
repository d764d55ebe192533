#!/usr/bin/env python
"""Command line for ``megatron_elastic.data.corpus``: a jsonl corpus from the stdlib's sources.

One document per ``*.py`` file of this interpreter's standard library (or ``--root``),
deterministic for given arguments, no network needed. See the module for the details.

Exit status: 0 on success, 2 on a user error (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_elastic.data.corpus import build_corpus, stdlib_root  # noqa: E402
from megatron_elastic.data.documents import DataError  # noqa: E402

__all__ = ["build_corpus", "stdlib_root", "parse_args", "main"]


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
    parser.add_argument(
        "--holdout",
        action="append",
        default=[],
        metavar="NAME=BYTES",
        help="hold whole files out of the corpus into <output stem>.NAME.jsonl until it has BYTES "
        "bytes (repeatable, e.g. --holdout valid=1000000 --holdout test=1000000); taken from the "
        "front of the (shuffled) file order before --max-docs/--max-bytes apply",
    )
    args = parser.parse_args(argv)
    holdout = {}
    for item in args.holdout:
        name, _, size = item.partition("=")
        if not name or not size.isdigit() or int(size) <= 0:
            parser.error(f"--holdout {item!r}: expected NAME=BYTES, e.g. valid=1000000")
        holdout[name] = int(size)
    args.holdout = holdout
    for name in ("max_docs", "max_bytes"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        summary = build_corpus(args.output, args.root, args.max_docs, args.max_bytes, args.seed, args.holdout)
    except (DataError, FileNotFoundError) as error:
        print(f"build_corpus.py: error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {summary['documents']} documents ({summary['text_bytes']:,} bytes of text) from "
        f"{summary['root']} to {summary['output']}"
    )
    print(
        f"  candidates={summary['candidates']} seed={summary['seed']} "
        f"skipped: not UTF-8={summary['skipped_undecodable']} empty={summary['skipped_empty']}"
    )
    for name, held in summary["holdout"].items():
        print(f"  held out {name}: {held['documents']} documents ({held['text_bytes']:,} bytes) -> {held['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
