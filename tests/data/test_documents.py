"""The shared document reader (megatron_elastic.data.documents) and the tokenizer trainer's
sentence splitting, without tokenizers: exact documents, chunk boundaries, line numbers in errors,
and the fact that tokenizer training and preprocessing report malformed input identically."""

from __future__ import annotations

import pickle

import pytest

from megatron_elastic.data.documents import DataError, check_inputs, is_jsonl, read_chunks, read_documents
from megatron_elastic.data.tokenizer_training import CorpusStream, split_for_training


def test_format_follows_suffix_unless_forced(tmp_path):
    assert is_jsonl(tmp_path / "a.jsonl") and is_jsonl(tmp_path / "a.json")
    assert not is_jsonl(tmp_path / "a.txt") and not is_jsonl(tmp_path / "a")
    assert is_jsonl(tmp_path / "a.txt", "jsonl") and not is_jsonl(tmp_path / "a.jsonl", "text")


def test_read_documents_in_order(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"text": "one\\n"}\n\n  \n{"text": "", "x": 1}\n{"text": "r\xc3\xa9sum\xc3\xa9"}\n')
    text = tmp_path / "t.txt"
    text.write_bytes(b"whole file\r\n\nis one document")
    # blank lines dropped; empty documents kept (callers count and skip them); bytes kept exactly
    assert list(read_documents([data, text])) == ["one\n", "", "r\u00e9sum\u00e9",
                                                 "whole file\r\n\nis one document"]
    # forced formats: a jsonl file read as text is one document, its raw bytes
    assert list(read_documents([data], "text")) == [data.read_text()]


def test_chunks_carry_first_line_numbers(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"text": "{i}"}}\n' for i in range(1, 8)))
    chunks = list(read_chunks([data], "auto", 3))
    assert [(c.first_line, len(c.lines)) for c in chunks] == [(1, 3), (4, 3), (7, 1)]
    assert [list(c.documents("text")) for c in chunks] == [["1", "2", "3"], ["4", "5", "6"], ["7"]]
    assert pickle.loads(pickle.dumps(chunks[1])) == chunks[1]  # sent to preprocessing workers


@pytest.mark.parametrize("line, message", [
    (b'{"text": 1,}\n', "invalid JSON: Expecting property name enclosed in double quotes (column 12)"),
    (b'{"content": "x"}\n', "missing key 'text' (keys present: 'content'; see --json-key)"),
    (b'{}\n', "missing key 'text' (keys present: none; see --json-key)"),
    (b'{"text": 7}\n', "'text' is int, expected a string"),
    (b'["text"]\n', "expected a JSON object, got list"),
    (b'{"text": "\xff"}\n', "not valid UTF-8"),
])
def test_errors_name_file_and_line(tmp_path, line, message):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"text": "a"}\n\n' + line)  # the bad line is line 3
    with pytest.raises(DataError) as error:
        list(read_documents([data], chunk_lines=2))
    assert str(error.value).startswith(f"{data}:3: ") and message in str(error.value)
    # tokenizer training reads through the same reader: same exception, same message
    stream = CorpusStream([data], "auto", "text", max_bytes=100, sample_size=1)
    with pytest.raises(DataError) as again:
        list(stream)
    assert str(again.value) == str(error.value) and stream.error is again.value


def test_text_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff")
    with pytest.raises(DataError, match=rf"^{bad}: not valid UTF-8"):
        list(read_documents([bad]))


def test_check_inputs(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    check_inputs([tmp_path / "a.jsonl"])
    with pytest.raises(DataError, match=rf"^input file not found: {tmp_path / 'b.jsonl'}$"):
        check_inputs([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])


def test_split_for_training_cuts_at_line_ends():
    assert list(split_for_training("aa\nbb\ncc\n", 6)) == ["aa\nbb\n", "cc\n"]
    assert list(split_for_training("aa\nbb\ncc\n", 100)) == ["aa\nbb\ncc\n"]
    # one over-long line is cut by characters, never inside a UTF-8 sequence (é is 2 bytes)
    assert list(split_for_training("abcdefgh\nx", 3)) == ["abc", "def", "gh\n", "x"]
    assert list(split_for_training("\u00e9\u00e9\u00e9", 3)) == ["\u00e9", "\u00e9", "\u00e9"]
    assert list(split_for_training("", 16)) == []
