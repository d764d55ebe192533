#!/usr/bin/env python
"""Command line for ``megatron_elastic.data.preprocess``: jsonl/text -> Megatron ``.bin``/``.idx``.

Writes ``{output_prefix}_{json_key}_document.bin/.idx`` (Megatron-LM's naming) with megatron-core's
``IndexedDatasetBuilder``, plus the ``.meta.json`` vocabulary record the trainer checks. Output
bytes do not depend on ``--workers``; a failed run leaves no files. See the module for the details.

With ``--chat`` the input is chat jsonl (``messages`` with roles system/user/assistant, or
``prompt``/``response``; see ``megatron_elastic.data.chat``): each conversation is rendered with
the tokenizer's chat template (or ``--chat-template FILE``, required for a sentencepiece model)
and written to ``{output_prefix}_chat_document.bin/.idx`` with its loss mask (1 on assistant
tokens) in ``{output_prefix}_chat_document.loss_mask.bin/.idx`` (``data/chat_preprocess.py``).

Exit status: 0 on success, 2 on a user error (bad input, unreadable tokenizer), with one line on
stderr naming the file and the fix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_elastic.data.documents import add_document_arguments  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tokenize jsonl/text into Megatron .bin/.idx files.",
    )
    add_document_arguments(
        parser, input_help="jsonl or text files, in order",
        json_key_help="jsonl field holding the text; also part of the output name (default: %(default)s)",
    )
    parser.add_argument(
        "--tokenizer-model", type=Path, required=True,
        help="sentencepiece .model file, or a Hugging Face tokenizer directory (with tokenizer.json)"
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
        "--chat", action="store_true",
        help="chat jsonl ('messages' or 'prompt'/'response' per line) -> tokens + assistant-only "
        "loss mask, OUTPUT_PREFIX_chat_document[.loss_mask].bin/.idx; --json-key and --append-eod "
        "do not apply",
    )
    parser.add_argument(
        "--chat-template", type=Path, default=None,
        help="Jinja chat template file for --chat (default: the Hugging Face tokenizer's own; "
        "required for a sentencepiece .model)",
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
    if args.chat_template is not None and not args.chat:
        parser.error("--chat-template applies to --chat only")
    return args


def main_chat(args: argparse.Namespace) -> int:
    from megatron_elastic.data.chat_preprocess import preprocess_chat

    try:
        summary = preprocess_chat(
            args.input, args.tokenizer_model, args.output_prefix, chat_template=args.chat_template,
            input_format=args.input_format, workers=args.workers, chunk_lines=args.chunk_lines,
            progress=args.progress,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"preprocess_data.py: error: {error}", file=sys.stderr)
        return 2
    p50, p90, p99, longest = summary["length_p50_p90_p99_max"]
    print(
        f"wrote {summary['conversations']:,} conversations, {summary['tokens']:,} tokens, "
        f"{summary['assistant_tokens']:,} with loss ({summary['dtype']}, vocab_size="
        f"{summary['vocab_size']}, chat template of {summary['chat_template']}) with "
        f"{summary['workers']} worker(s) in {summary['seconds']:.1f}s"
    )
    print(f"  tokens per conversation: median {p50}, p90 {p90}, p99 {p99}, max {longest} (longer than "
          "model.seq_length+1 are truncated in training); skipped "
          f"{summary['blank_lines']} blank lines")
    print(f"  {summary['prefix']}.bin/.idx\n  {summary['mask_prefix']}.bin/.idx\n  {summary['meta']}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    # Imported after argument parsing: megatron-core takes seconds to import, --help should not.
    if args.chat:
        return main_chat(args)
    from megatron_elastic.data.preprocess import preprocess

    try:
        summary = preprocess(
            args.input, args.tokenizer_model, args.output_prefix,
            input_format=args.input_format, json_key=args.json_key, append_eod=args.append_eod,
            workers=args.workers, chunk_lines=args.chunk_lines, progress=args.progress,
        )
    except (ValueError, FileNotFoundError) as error:  # DataError, or a model without EOS
        print(f"preprocess_data.py: error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {summary['documents']:,} documents, {summary['tokens']:,} tokens "
        f"({summary['dtype']}, vocab_size={summary['vocab_size']}, eod={summary['eod']}) "
        f"with {summary['workers']} worker(s) in {summary['seconds']:.1f}s"
    )
    print(
        f"  skipped: {summary['empty_skipped']} empty documents, "
        f"{summary['blank_lines']} blank lines"
    )
    print(f"  {summary['bin']}\n  {summary['idx']}\n  {summary['meta']} (max token id "
          f"{summary['max_token_id']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
