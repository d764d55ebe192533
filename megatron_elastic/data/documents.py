"""Reading documents from jsonl or plain-text files: the one reader every data tool uses.

Inputs: ``*.jsonl``/``*.json`` files hold one JSON object per line and the document is its
``json_key`` string; any other file is one plain-text document (``input_format`` "auto"; "jsonl" or
"text" force one reading for every file). Blank jsonl lines are ignored. Anything else malformed
(invalid JSON or UTF-8, a line that is not an object, a missing key, a non-string value) raises
:class:`DataError` naming the file and 1-based line number.

Files are read as raw lines grouped into :class:`Chunk` s, so that parsing can happen in worker
processes (``megatron_elastic.data.preprocess``) as well as in-line (:func:`read_documents`, used
by tokenizer training): both go through :meth:`Chunk.documents`, hence the same errors.

Standard library only: the tools import this before (or without) megatron-core.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

INPUT_FORMATS = ("auto", "jsonl", "text")


class DataError(ValueError):
    """Input problem the user has to fix; the message says what and where (file and line).

    Picklable, so preprocessing workers can raise it across processes.
    """


def is_jsonl(path: Path, requested: str = "auto") -> bool:
    """Whether ``path`` is read as jsonl: forced by ``requested``, else by its suffix."""
    if requested != "auto":
        return requested == "jsonl"
    return Path(path).suffix in (".jsonl", ".json")


def check_inputs(paths: Sequence[Path]) -> None:
    """Raise :class:`DataError` for the first input that is not a file."""
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"input file not found: {path}")


def document_text(raw: bytes, json_key: Optional[str], where: str) -> Optional[str]:
    """The document in one jsonl line (or a whole text file when ``json_key`` is None).

    Returns None for a blank jsonl line; ``where`` ("file:line" or "file") prefixes every error.
    """
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: not valid UTF-8: {error}") from None
    if json_key is None:
        return line
    record = parse_record(line, where)
    if record is None:
        return None
    if json_key not in record:
        keys = ", ".join(sorted(map(repr, record))) or "none"
        raise DataError(f"{where}: missing key {json_key!r} (keys present: {keys}; see --json-key)")
    text = record[json_key]
    if not isinstance(text, str):
        raise DataError(f"{where}: {json_key!r} is {type(text).__name__}, expected a string")
    return text


def parse_record(line: str, where: str) -> Optional[dict]:
    """The JSON object on one jsonl line; None for a blank line."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: invalid JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


@dataclass(frozen=True)
class Chunk:
    """A unit of work: consecutive jsonl lines, or one whole text file (``first_line == 0``)."""

    path: str
    first_line: int
    lines: List[bytes]
    is_jsonl: bool

    def documents(self, json_key: str) -> Iterator[Optional[str]]:
        """One entry per line (per file for text): its document, or None for a blank jsonl line."""
        for offset, raw in enumerate(self.lines):
            if self.is_jsonl:
                yield document_text(raw, json_key, f"{self.path}:{self.first_line + offset}")
            else:
                yield document_text(raw, None, self.path)

    def records(self) -> Iterator[Tuple[str, Optional[dict]]]:
        """``("file:line", object)`` per jsonl line (object None for a blank line)."""
        if not self.is_jsonl:
            raise DataError(f"{self.path}: chat data must be jsonl (one conversation per line), "
                            "not a plain-text file; name it *.jsonl or pass --input-format jsonl")
        for offset, raw in enumerate(self.lines):
            where = f"{self.path}:{self.first_line + offset}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not valid UTF-8: {error}") from None
            yield where, parse_record(line, where)


def read_chunks(paths: Sequence[Path], input_format: str, chunk_lines: int) -> Iterator[Chunk]:
    """Split the inputs into chunks of at most ``chunk_lines`` lines, lazily and in input order."""
    for path in paths:
        path = Path(path)
        if not is_jsonl(path, input_format):
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


def read_documents(
    paths: Sequence[Path], input_format: str = "auto", json_key: str = "text", chunk_lines: int = 256
) -> Iterator[str]:
    """Yield the documents of ``paths`` in order (empty ones included, blank jsonl lines not)."""
    for chunk in read_chunks(paths, input_format, chunk_lines):
        for text in chunk.documents(json_key):
            if text is not None:
                yield text


def add_document_arguments(parser, input_help: str, json_key_help: str) -> None:
    """The --input / --input-format / --json-key options every data tool takes, read by
    ``iter_documents``'s callers the same way."""
    from pathlib import Path

    parser.add_argument("--input", type=Path, nargs="+", required=True, help=input_help)
    parser.add_argument(
        "--input-format",
        choices=INPUT_FORMATS,
        default="auto",
        help="auto: *.jsonl/*.json are jsonl (one document per line), anything else is text "
        "(one document per file) (default: %(default)s)",
    )
    parser.add_argument("--json-key", default="text", help=json_key_help)

