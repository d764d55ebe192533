#!/usr/bin/env python
"""Command line for ``megatron_elastic.data.tokenizer_training``: a lossless sentencepiece model.

Trains BPE or unigram on jsonl/text files with settings that make ``decode(encode(text)) == text``
for any text (identity normalisation, whitespace kept, newlines learned, byte fallback, ids
``unk=0 bos=1 eos=2 pad=3``) and writes ``{output_prefix}.model`` and ``.vocab``. See the module
for why each option is set.

Exit status: 0 on success, 2 on a user error (bad input, impossible options), with one line on
stderr naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_elastic.data.documents import DataError, add_document_arguments  # noqa: E402
from megatron_elastic.data.tokenizer_training import (  # noqa: E402
    MIN_CHARACTER_COVERAGE,
    train_tokenizer,
)


def _usage_error(message: str) -> None:
    """One line on stderr and exit 2 (argparse's own ``error`` also prints the whole usage)."""
    print(f"train_tokenizer.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a lossless sentencepiece tokenizer on jsonl/text files.",
    )
    add_document_arguments(parser, input_help="jsonl or text files",
                           json_key_help="jsonl field holding the text (default: %(default)s)")
    parser.add_argument(
        "--output-prefix", type=Path, required=True, help="writes PREFIX.model and PREFIX.vocab"
    )
    parser.add_argument(
        "--model-type", choices=("bpe", "unigram"), default="bpe", help="(default: %(default)s)"
    )
    parser.add_argument(
        "--vocab-size", type=int, default=8192, help="pieces incl. specials (default: %(default)s)"
    )
    parser.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        help="fraction of characters that get their own piece, in [0.98, 1] (sentencepiece's "
        "range); the rest use byte fallback (default: %(default)s)",
    )
    parser.add_argument(
        "--input-sentence-size",
        type=int,
        default=0,
        help="train on a random sample of this many sentences (0 = all; sentencepiece requires "
        "> 100 otherwise)",
    )
    parser.add_argument(
        "--max-sentence-length",
        type=int,
        default=16384,
        help="documents are cut at line ends into training sentences of at most this many bytes "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=1234, help="sentencepiece's sampling seed (default: %(default)s)"
    )
    parser.add_argument(
        "--num-threads", type=int, default=os.cpu_count() or 1, help="(default: %(default)s)"
    )
    parser.add_argument(
        "--verify-docs",
        type=int,
        default=32,
        help="check decode(encode(doc)) == doc on this many leading documents after training "
        "(default: %(default)s)",
    )
    parser.add_argument("--verbose", action="store_true", help="show sentencepiece's own log")
    args = parser.parse_args(argv)
    if args.vocab_size <= 0:
        parser.error("--vocab-size must be positive")
    if not MIN_CHARACTER_COVERAGE <= args.character_coverage <= 1.0:
        _usage_error(
            f"--character-coverage {args.character_coverage:g} is outside [{MIN_CHARACTER_COVERAGE}, "
            "1], the range sentencepiece accepts: use e.g. --character-coverage 0.9995 (characters "
            "outside the coverage are spelled with byte-fallback pieces, so nothing is lost)"
        )
    if args.input_sentence_size < 0 or 0 < args.input_sentence_size <= 100:
        parser.error("--input-sentence-size must be 0 (use all) or greater than 100")
    if args.max_sentence_length < 16:
        parser.error("--max-sentence-length must be at least 16 bytes")
    if args.verify_docs < 0:
        parser.error("--verify-docs must be >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        summary = train_tokenizer(
            args.input, args.output_prefix,
            input_format=args.input_format, json_key=args.json_key, model_type=args.model_type,
            vocab_size=args.vocab_size, character_coverage=args.character_coverage,
            input_sentence_size=args.input_sentence_size,
            max_sentence_length=args.max_sentence_length, seed=args.seed,
            num_threads=args.num_threads, verify_docs=args.verify_docs, verbose=args.verbose,
        )
    except DataError as error:
        print(f"train_tokenizer.py: error: {error}", file=sys.stderr)
        return 2
    print(
        f"trained {summary['model_type']} tokenizer, vocab_size={summary['vocab_size']}, on "
        f"{summary['documents']:,} documents ({summary['chars']:,} chars, "
        f"{summary['sentences']:,} training sentences; {summary['empty_documents']} empty skipped) "
        f"in {summary['train_seconds']:.1f}s"
    )
    print(
        f"  special ids: eod/eos={summary['eod']} bos={summary['bos']} pad={summary['pad']} "
        f"unk={summary['unk']}"
    )
    print(
        f"  round trip verified on {summary['verified']} texts; "
        f"{summary['chars_per_token']:.2f} chars/token on the verified documents"
    )
    print(f"  wrote {summary['model']} and {summary['vocab']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
