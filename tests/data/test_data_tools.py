"""Tests for the data tooling: corpus building, tokenizer training, Megatron preprocessing.

The logic lives in ``megatron_elastic.data`` (``corpus``, ``tokenizer_training``, ``preprocess``,
``documents``); ``tools/*.py`` are its command lines. One small corpus (a seeded sample of stdlib
files) and one small BPE tokenizer are built per session and shared, so the whole file stays fast
on two CPU cores. The tools' ``main`` functions are called in-process for most checks (exit codes
and messages included); ``test_command_line_pipeline`` runs all three as
subprocesses so the documented command lines themselves are exercised.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy
import pytest

from helpers import REPO


def _load_tool(name: str):
    """Import ``tools/{name}.py`` (tools/ is not a package), registered in ``sys.modules``."""
    module_name = f"_data_tools_{name}"
    spec = importlib.util.spec_from_file_location(module_name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


build_corpus = _load_tool("build_corpus")
train_tokenizer = _load_tool("train_tokenizer")
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    preprocess_data = _load_tool("preprocess_data")
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.tokenizers import MegatronTokenizerBase

    from megatron_elastic.data.tokenizer import SentencePieceTokenizer

CORPUS_ARGS = ["--max-docs", "60", "--max-bytes", "1500000", "--seed", "3"]
TRAIN_DOCS = 40  # the tokenizer sees the first 40 documents; the rest are unseen text
VOCAB_SIZE = 1000


def read_jsonl(path: Path) -> list:
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream]


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as stream:
        for record in records:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def produced_files(directory: Path) -> list:
    """Everything a tool left behind in ``directory`` besides the test's own inputs."""
    return sorted(p.name for p in directory.iterdir() if p.suffix not in (".jsonl", ".txt"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "stdlib.jsonl"
    assert build_corpus.main(["--output", str(path), *CORPUS_ARGS]) == 0
    return path


@pytest.fixture(scope="session")
def corpus_docs(corpus) -> list:
    return [record["text"] for record in read_jsonl(corpus)]


@pytest.fixture(scope="session")
def tokenizer_model(corpus, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    train_corpus = directory / "train.jsonl"
    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    train_corpus.write_text("".join(lines[:TRAIN_DOCS]), encoding="utf-8")
    prefix = directory / "spm"
    argv = ["--input", str(train_corpus), "--output-prefix", str(prefix)]
    assert train_tokenizer.main([*argv, "--vocab-size", str(VOCAB_SIZE), "--num-threads", "2"]) == 0
    return Path(f"{prefix}.model")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_model) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(tokenizer_model)


# -- corpus ---------------------------------------------------------------------------------------


def test_build_corpus_is_deterministic(tmp_path, corpus):
    again = tmp_path / "again.jsonl"
    assert build_corpus.main(["--output", str(again), *CORPUS_ARGS]) == 0
    assert again.read_bytes() == corpus.read_bytes()

    records = read_jsonl(corpus)
    assert len(records) <= 60
    assert sum(len(r["text"].encode("utf-8")) for r in records) <= 1_500_000
    assert all(r["text"] and r["path"].endswith(".py") for r in records)
    assert not any("site-packages" in r["path"] for r in records)

    # The text is the file's exact content: no newline translation or re-encoding.
    root = build_corpus.stdlib_root()
    for record in records[:5]:
        assert (root / record["path"]).read_bytes() == record["text"].encode("utf-8")

    other_seed = tmp_path / "other.jsonl"
    assert build_corpus.main(["--output", str(other_seed), "--max-docs", "60", "--seed", "4"]) == 0
    assert other_seed.read_bytes() != corpus.read_bytes()


def test_build_corpus_without_seed_keeps_sorted_order(tmp_path):
    out = tmp_path / "sorted.jsonl"
    assert build_corpus.main(["--output", str(out), "--max-docs", "25"]) == 0
    paths = [r["path"] for r in read_jsonl(out)]
    assert len(paths) == 25 and paths == sorted(paths)


def test_build_corpus_rejects_limits_that_leave_nothing(tmp_path, capsys):
    out = tmp_path / "none.jsonl"
    assert build_corpus.main(["--output", str(out), "--max-bytes", "1"]) == 2
    assert "--max-bytes" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_build_corpus_holdout_takes_whole_files_before_the_limits(tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    args = ["--output", str(out), "--seed", "5", "--max-docs", "20"]
    assert build_corpus.main(args + ["--holdout", "valid=20000", "--holdout", "test=10000"]) == 0
    assert "held out valid" in capsys.readouterr().out
    train, valid, test = (read_jsonl(tmp_path / n) for n in ("c.jsonl", "c.valid.jsonl", "c.test.jsonl"))
    sizes = [sum(len(r["text"].encode()) for r in part) for part in (valid, test)]
    # Whole files until each split reaches its size: at least the size, and without its last
    # file less than it.
    assert sizes[0] >= 20000 and sizes[0] - len(valid[-1]["text"].encode()) < 20000
    assert sizes[1] >= 10000 and sizes[1] - len(test[-1]["text"].encode()) < 10000
    names = [{r["path"] for r in part} for part in (train, valid, test)]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert len(train) == 20  # --max-docs applies to what is left
    # The held-out files are the front of the seeded order, so the training part is what a run
    # without holdout gives after them.
    plain = tmp_path / "plain.jsonl"
    assert build_corpus.main(["--output", str(plain), "--seed", "5"]) == 0
    order = [r["path"] for r in read_jsonl(plain)]
    assert order[: len(valid) + len(test)] == [r["path"] for r in valid + test]
    for bad in ("valid", "valid=0", "=5", "valid=x"):
        with pytest.raises(SystemExit):
            build_corpus.parse_args(["--output", str(out), "--holdout", bad])


# -- tokenizer ------------------------------------------------------------------------------------

ROUND_TRIP_SAMPLES = [
    "",
    "plain words",
    "  leading and trailing spaces   ",
    "tabs\tbetween\t\tcolumns\t",
    "line one\nline two\n\n\nafter blank lines\n",
    "windows\r\nline\r\nendings\r\n",
    "def f(x):\n    if x:\n        return [1, 2]\n\treturn None\n",
    "digits 0123456789 3.14159 1e-10 0xFF 1_000_000",
    "unicode: r\u00e9sum\u00e9 na\u00efve \u00fc\u00df \u4e16\u754c \u3053\u3093\u306b\u3061\u306f "
    "\u0645\u0631\u062d\u0628\u0627 \U0001f642\U0001f680",
    "sentencepiece's own space marker \u2581 and \u2581\u2581 doubled",
    "controls \x00\x01\x1b[0m \x0b\x0c and a zero-width joiner \u200d",
    " \n \t \r ",
]


@pytest.mark.parametrize("text", ROUND_TRIP_SAMPLES, ids=range(len(ROUND_TRIP_SAMPLES)))
def test_decode_encode_round_trips(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(numpy.asarray(ids, dtype=numpy.uint16)) == text


def test_round_trip_on_seen_and_unseen_stdlib_files(tokenizer, corpus_docs):
    assert len(corpus_docs) > TRAIN_DOCS  # some documents were not used for training
    for text in corpus_docs:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_ids_and_megatron_interface(tokenizer, tokenizer_model):
    assert isinstance(tokenizer, MegatronTokenizerBase)
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert (tokenizer.unk, tokenizer.bos, tokenizer.eod, tokenizer.pad) == (0, 1, 2, 3)
    assert tokenizer.eos == tokenizer.eod
    assert tokenizer.eod not in tokenizer.encode("no special ids are added\n")
    assert tokenizer.tokenize("x y") == tokenizer.encode("x y")
    assert tokenizer.detokenize(tokenizer.tokenize("x y")) == "x y"
    assert tokenizer.vocab[tokenizer.inv_vocab[5]] == 5
    assert len(tokenizer.vocab) == VOCAB_SIZE

    # MegatronDataset json-dumps unique_identifiers into its cache key: content, not location.
    identifiers = json.loads(json.dumps(tokenizer.unique_identifiers))
    assert identifiers["model_sha256"] and "tokenizer_path" not in identifiers

    restored = pickle.loads(pickle.dumps(tokenizer))
    assert restored.encode(ROUND_TRIP_SAMPLES[8]) == tokenizer.encode(ROUND_TRIP_SAMPLES[8])
    assert restored.unique_identifiers == tokenizer.unique_identifiers

    with pytest.raises(FileNotFoundError, match="not found"):
        SentencePieceTokenizer(tokenizer_model.with_name("missing.model"))


def test_train_unigram_round_trips(tmp_path, corpus_docs):
    data = write_jsonl(tmp_path / "small.jsonl", [{"text": t} for t in corpus_docs[:6]])
    prefix = tmp_path / "uni"
    argv = ["--input", str(data), "--output-prefix", str(prefix), "--model-type", "unigram"]
    assert train_tokenizer.main([*argv, "--vocab-size", "400", "--num-threads", "2"]) == 0
    tok = SentencePieceTokenizer(f"{prefix}.model")
    assert tok.vocab_size == 400 and tok.eod == 2
    for text in ROUND_TRIP_SAMPLES + corpus_docs[6:12]:
        assert tok.decode(tok.encode(text)) == text


def test_train_tokenizer_reads_text_files_and_keeps_newlines(tmp_path, corpus_docs):
    files = []
    for i, text in enumerate(corpus_docs[:4]):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(text, encoding="utf-8")

    def train(prefix):
        argv = ["--input", *map(str, files), "--output-prefix", str(prefix)]
        assert train_tokenizer.main([*argv, "--vocab-size", "500"]) == 0
        return Path(f"{prefix}.model")

    model = train(tmp_path / "txt")
    tok = SentencePieceTokenizer(model)
    # "\n" reached the trainer: it is a learned piece (not byte fallback) and merges like text.
    assert tok.encode("\n") == [tok.vocab["\n"]]
    assert any("\n" in piece and piece != "\n" for piece in tok.vocab)
    # Same inputs and seed, same model bytes.
    assert train(tmp_path / "again").read_bytes() == model.read_bytes()


def test_train_tokenizer_errors_name_the_fix(tmp_path, capsys, corpus_docs):
    prefix = str(tmp_path / "out" / "spm")

    def run(*argv):
        code = train_tokenizer.main([*argv, "--output-prefix", prefix])
        return code, capsys.readouterr().err

    code, err = run("--input", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "input file not found" in err and "missing.jsonl" in err

    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": ""}])
    code, err = run("--input", str(empty))
    assert code == 2 and "empty corpus" in err

    tiny = write_jsonl(tmp_path / "tiny.jsonl", [{"text": corpus_docs[0][:2000]}])
    code, err = run("--input", str(tiny), "--vocab-size", "50000")
    assert code == 2 and "--vocab-size 50000 is too large" in err and "Lower --vocab-size" in err

    code, err = run("--input", str(tiny), "--vocab-size", "100")
    assert code == 2 and "too small" in err and "Raise --vocab-size" in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": 7}\n')
    code, err = run("--input", str(bad), "--vocab-size", "300")
    assert code == 2 and f"{bad}:3" in err and "expected a string" in err
    assert not (tmp_path / "out" / "spm.model").exists()


# -- preprocessing --------------------------------------------------------------------------------


def preprocess(tmp_path, model, inputs, *extra, prefix="data"):
    argv = ["--input", *map(str, inputs), "--tokenizer-model", str(model)]
    return preprocess_data.main([*argv, "--output-prefix", str(tmp_path / prefix), *extra])


def test_preprocess_round_trip_through_indexed_dataset(
    tmp_path, capsys, tokenizer, tokenizer_model, corpus_docs
):
    texts = corpus_docs[:10] + ROUND_TRIP_SAMPLES[1:]
    records = [{"text": t, "id": i} for i, t in enumerate(texts)]
    records.insert(3, {"text": ""})  # skipped and counted
    data = write_jsonl(tmp_path / "docs.jsonl", records)
    with open(data, "a") as stream:
        stream.write("\n")  # a trailing blank line is tolerated
    extra_doc = tmp_path / "extra.txt"
    extra_doc.write_text("a plain text file is one document\n\nwith its blank line\n")

    assert preprocess(tmp_path, tokenizer_model, [data, extra_doc]) == 0
    out = capsys.readouterr().out
    assert "1 empty documents" in out and "1 blank lines" in out

    expected = texts + [extra_doc.read_text()]
    dataset = IndexedDataset(str(tmp_path / "data_text_document"))
    assert len(dataset) == len(expected)
    assert len(dataset.document_indices) == len(expected) + 1
    assert dataset.index.dtype == numpy.uint16
    for i, text in enumerate(expected):
        tokens = dataset[i].tolist()
        assert tokens == tokenizer.encode(text) + [tokenizer.eod]
        assert tokenizer.decode(tokens) == text  # eod decodes to nothing
    assert produced_files(tmp_path) == [
        "data_text_document.bin", "data_text_document.idx", "data_text_document.meta.json"]
    # The vocabulary record the trainer checks before its first step.
    meta = json.loads((tmp_path / "data_text_document.meta.json").read_text())
    all_tokens = numpy.concatenate([dataset[i] for i in range(len(dataset))])
    assert meta["max_token_id"] == int(all_tokens.max()) and meta["tokens"] == all_tokens.size
    assert meta["vocab_size"] == tokenizer.vocab_size and meta["documents"] == len(expected)
    assert meta["tokenizer_model"] == str(Path(tokenizer_model).resolve())


def test_preprocess_without_eod_and_with_other_json_key(tmp_path, tokenizer, tokenizer_model):
    data = write_jsonl(tmp_path / "docs.jsonl", [{"body": "first doc\n"}, {"body": "second\tdoc"}])
    extra = ["--json-key", "body", "--no-append-eod"]
    assert preprocess(tmp_path, tokenizer_model, [data], *extra, prefix="raw") == 0
    dataset = IndexedDataset(str(tmp_path / "raw_body_document"))
    assert [dataset[i].tolist() for i in range(len(dataset))] == [
        tokenizer.encode("first doc\n"),
        tokenizer.encode("second\tdoc"),
    ]


def test_preprocess_output_is_independent_of_worker_count(tmp_path, tokenizer_model, corpus):
    for workers in ("1", "2"):
        argv = ["--workers", workers, "--chunk-lines", "3"]
        assert preprocess(tmp_path, tokenizer_model, [corpus], *argv, prefix=f"w{workers}") == 0
    for suffix in (".bin", ".idx"):
        one = (tmp_path / f"w1_text_document{suffix}").read_bytes()
        two = (tmp_path / f"w2_text_document{suffix}").read_bytes()
        assert one == two and len(one) > 0


MALFORMED = {
    "invalid_json": (b'{"text": "truncated\n', "invalid JSON"),
    "missing_key": (b'{"content": "x"}\n', "missing key 'text'"),
    "non_string": (b'{"text": ["a", "b"]}\n', "'text' is list, expected a string"),
    "not_an_object": (b'"just a string"\n', "expected a JSON object"),
    "bad_utf8": (b'{"text": "\xff\xfe"}\n', "not valid UTF-8"),
}


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_preprocess_malformed_input_names_file_and_line(
    tmp_path, capsys, tokenizer_model, case, workers
):
    bad_line, message = MALFORMED[case]
    good = [json.dumps({"text": f"document {i}\n"}).encode() + b"\n" for i in range(6)]
    data = tmp_path / "input.jsonl"
    data.write_bytes(b"".join(good[:4]) + bad_line + b"".join(good[4:]))  # bad line is line 5

    code = preprocess(tmp_path, tokenizer_model, [data], "--workers", workers, "--chunk-lines", "2")
    err = capsys.readouterr().err
    assert code == 2
    assert f"{data}:5:" in err and message in err
    assert produced_files(tmp_path) == []  # no .bin/.idx and no temporary files


def test_preprocess_missing_input_and_empty_input(tmp_path, capsys, tokenizer_model):
    assert preprocess(tmp_path, tokenizer_model, [tmp_path / "nope.jsonl"]) == 2
    assert "input file not found" in capsys.readouterr().err

    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}])
    assert preprocess(tmp_path, tokenizer_model, [empty]) == 2
    assert "no non-empty documents" in capsys.readouterr().err
    assert produced_files(tmp_path) == []


def test_gpt_dataset_builds_from_preprocessed_data(tmp_path, tokenizer, tokenizer_model, corpus):
    """The point of the exercise: megatron-core's GPTDataset accepts the tokenizer and files."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    assert preprocess(tmp_path, tokenizer_model, [corpus]) == 0
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=64,
        blend=([str(tmp_path / "data_text_document")], None),
        split="98,2,0",
        tokenizer=tokenizer,
        reset_position_ids=True,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=str(tmp_path / "cache"),
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [32, 4, 0], lambda: True, config)
    train, valid, _ = builder.build()
    assert len(train) >= 32 and len(valid) >= 4
    tokens = numpy.concatenate([train[i]["tokens"].numpy() for i in range(len(train))])
    assert tokens.max() < tokenizer.vocab_size and (tokens == tokenizer.eod).any()


# -- command lines --------------------------------------------------------------------------------


@pytest.mark.slow
def test_command_line_pipeline(tmp_path):
    """corpus -> tokenizer -> .bin/.idx, each tool run as ``python tools/X.py`` from the repo."""

    def run(tool, *argv):
        result = subprocess.run(
            [sys.executable, f"tools/{tool}.py", *map(str, argv)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    corpus = tmp_path / "corpus.jsonl"
    out = run("build_corpus", "--output", corpus, "--max-docs", 12, "--seed", 1)
    assert "wrote 12 documents" in out

    prefix = tmp_path / "tok" / "spm"
    out = run(
        "train_tokenizer", "--input", corpus, "--output-prefix", prefix, "--vocab-size", 600,
        "--model-type", "bpe", "--character-coverage", "0.9995", "--json-key", "text",
    )
    assert "vocab_size=600" in out and "eod/eos=2" in out and "round trip verified" in out

    data_prefix = tmp_path / "bin" / "stdlib"
    out = run(
        "preprocess_data", "--input", corpus, "--tokenizer-model", f"{prefix}.model",
        "--output-prefix", data_prefix, "--workers", 2, "--json-key", "text", "--append-eod",
    )
    assert "wrote 12 documents" in out
    tok = SentencePieceTokenizer(f"{prefix}.model")
    dataset = IndexedDataset(f"{data_prefix}_text_document")
    texts = [r["text"] for r in read_jsonl(corpus)]
    assert [dataset[i].tolist() for i in range(len(dataset))] == [
        tok.encode(t) + [tok.eod] for t in texts
    ]
