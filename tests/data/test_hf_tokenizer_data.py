"""Hugging Face tokenizer directories as ``data.tokenizer_model`` / ``--tokenizer-model``.

One byte-level BPE tokenizer is trained per module with the ``tokenizers`` library on stdlib
text and saved with ``PreTrainedTokenizerFast.save_pretrained`` (as a pretrained model's
tokenizer would be): loading through ``data.tokenizer.load_tokenizer``, lossless round trips and
the ids ``AutoTokenizer`` gives, preprocessing and its ``.meta.json``, the input errors, and (slow)
training on it, exporting the checkpoint with tools/convert_to_hf.py and importing that back.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pickle
import shutil
import sys
import warnings
from pathlib import Path

import pytest

from helpers import REPO, run_distributed, run_tool, tiny_overrides, train_run

EOS = "<|endoftext|>"
SAMPLES = [
    "résumé 世界 \t\n  x",
    "def f(x):\n\tif x:\n        return 1234567890  \n\n\n  r\u00e9sum\u00e9 \u4e16\u754c \U0001f642\r\n x\x00 \t end",
    "  leading and trailing whitespace   ",
    "a\u2581b <s> </s> are plain text here",
]


def _load_tool(name: str):
    """Import ``tools/{name}.py`` (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_hf_tok_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _stdlib_text(limit: int = 300_000) -> list:
    texts, size = [], 0
    for path in sorted(Path(json.__file__).parents[1].glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        size += len(text)
        if size > limit:
            break
    return texts


def save_byte_level_bpe(directory: Path, texts: list, extra_special_tokens=(), **special) -> Path:
    """Train an 800-entry byte-level BPE on ``texts`` and ``save_pretrained`` it to ``directory``;
    ``special`` are ``PreTrainedTokenizerFast`` arguments (eos_token=..., chat_template=...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=[EOS, "<pad>", *extra_special_tokens],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def texts() -> list:
    return _stdlib_text()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, texts) -> Path:
    return save_byte_level_bpe(tmp_path_factory.mktemp("hf_tok") / "tok", texts, eos_token=EOS)


def _load(path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron_elastic.data.tokenizer import load_tokenizer

    return load_tokenizer(path)


# -- loading and conversion -----------------------------------------------------------------------


def test_hf_directory_round_trips_and_gives_autotokenizer_ids(hf_dir, texts, tmp_path):
    from megatron.core.tokenizers import MegatronTokenizerBase
    from transformers import AutoTokenizer

    tok = _load(hf_dir)
    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    assert isinstance(tok, MegatronTokenizerBase)
    assert tok.vocab_size == len(hf) == 800
    assert tok.eod == tok.eos == hf.convert_tokens_to_ids(EOS)
    assert tok.pad == -1 and tok.bos == -1  # no pad token: megatron-core's "none" value
    for text in SAMPLES + [t[:3000] for t in texts[:3]]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert ids == hf.encode(text, add_special_tokens=False)
        assert tok.tokenize(text) == ids and tok.detokenize(ids) == text
    # A literal special-token string is that token, as for AutoTokenizer (documented).
    assert tok.encode(f"a{EOS}b") == hf.encode(f"a{EOS}b", add_special_tokens=False)
    assert tok.eod in tok.encode(f"a{EOS}b") and tok.decode(tok.encode(f"a{EOS}b")) == "ab"
    import numpy

    assert tok.decode(numpy.asarray(tok.encode(SAMPLES[0]), dtype=numpy.uint16)) == SAMPLES[0]

    # Cache identity follows the content: the same files elsewhere, the same identifiers.
    copy = shutil.copytree(hf_dir, tmp_path / "copy")
    ids = tok.unique_identifiers
    assert ids["model_sha256"] == hashlib.sha256((hf_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert _load(copy).unique_identifiers == ids and "tokenizer_path" not in ids
    assert _load(copy / "tokenizer.json").unique_identifiers == ids  # the file means its directory
    restored = pickle.loads(pickle.dumps(tok))
    assert restored.encode(SAMPLES[1]) == tok.encode(SAMPLES[1])


def test_pad_is_used_only_when_distinct_from_eos(tmp_path, texts):
    texts = texts[:5]
    own = _load(save_byte_level_bpe(tmp_path / "own", texts, eos_token=EOS, pad_token="<pad>"))
    assert own.pad == 1 and own.eod == 0
    shared = _load(save_byte_level_bpe(tmp_path / "shared", texts, eos_token=EOS, pad_token=EOS))
    # pad == eos would make megatron-core's GPTDataset mask every EOD out of the loss.
    assert shared.pad == -1 and shared.eod == 0


def test_tokenizer_input_errors_are_one_line(tmp_path, hf_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"has no tokenizer.json and no \.model file: point at"):
        _load(empty)
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        _load(tmp_path / "missing")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x01not a model" * 50)
    with pytest.raises(ValueError, match="is not a sentencepiece model.*tokenizer.json"):
        _load(garbage)
    no_eos = tmp_path / "no_eos"
    no_eos.mkdir()
    shutil.copyfile(hf_dir / "tokenizer.json", no_eos / "tokenizer.json")
    (no_eos / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.raises(ValueError, match="has no eos_token.*tokenizer_config.json"):
        _load(no_eos)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be loaded") as info:
        _load(broken)
    assert "\n" not in str(info.value)


# -- preprocessing --------------------------------------------------------------------------------


def test_preprocess_with_hf_directory_writes_meta_naming_it(tmp_path, hf_dir, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    preprocess_data = _load_tool("preprocess_data")
    docs = SAMPLES + ["second document", "third, and the last"]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs))
    argv = ["--input", str(data), "--tokenizer-model", str(hf_dir), "--output-prefix", str(tmp_path / "d")]
    assert preprocess_data.main(argv) == 0
    prefix = tmp_path / "d_text_document"
    meta = json.loads(Path(f"{prefix}.meta.json").read_text())
    assert meta["tokenizer_model"] == str(hf_dir.resolve())
    assert meta["tokenizer_sha256"] == hashlib.sha256((hf_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert meta["vocab_size"] == 800 and meta["documents"] == len(docs)
    tok = _load(hf_dir)
    dataset = IndexedDataset(str(prefix))
    for i, text in enumerate(docs):
        ids = dataset[i]
        assert int(ids[-1]) == tok.eod and tok.decode(ids[:-1]) == text

    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    argv[3] = str(empty)
    assert preprocess_data.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no tokenizer.json" in err


# -- train, export, import ------------------------------------------------------------------------


@pytest.mark.slow
def test_train_export_and_import_with_hf_tokenizer(tmp_path, hf_dir, texts):
    """3 iterations on data tokenized with the HF directory; the exported directory's tokenizer
    (AutoTokenizer) gives the training ids; importing that export copies the tokenizer files."""
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:40]))
    run_tool("tools/preprocess_data.py", "--input", str(corpus), "--tokenizer-model", str(hf_dir),
             "--output-prefix", str(tmp_path / "corpus"), "--no-progress")
    data = {"prefix": str(tmp_path / "corpus_text_document"), "tokenizer": hf_dir}
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(data, tmp_path, **{"train.train_iters": 3, "checkpoint.save": str(run_dir),
                                                  "checkpoint.save_interval": 3})
    (result,) = run_distributed(train_run, 1, overrides, tmp_dir=tmp_path)
    assert result["iteration"] == 3 and len(result["losses"]) == 3

    out = tmp_path / "hf_export"
    run_tool("tools/convert_to_hf.py", "--load", str(run_dir), "--output", str(out), "--no-progress")
    exported = AutoTokenizer.from_pretrained(str(out))
    tok = _load(hf_dir)
    for text in SAMPLES:
        assert exported.encode(text, add_special_tokens=False) == tok.encode(text)
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == tok.eod
    # The embedding keeps the model's (padded) rows; the tokenizer keeps its own size.
    assert config["vocab_size"] >= len(exported) == 800
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "sep_token" not in tok_config  # megatron-core's in-memory aliases are not exported
    assert not (out / "tokenizer.model").exists()

    imported = tmp_path / "imported"
    run_tool("tools/convert_from_hf.py", "--hf-dir", str(out), "--output", str(imported), "--no-progress")
    from megatron_elastic.config import load_config

    recipe = load_config(imported / "megatron_config.yaml")
    assert Path(recipe.data.tokenizer_model) == (imported / "tokenizer").resolve()
    again = _load(recipe.data.tokenizer_model)
    assert again.unique_identifiers["model_sha256"] == hashlib.sha256(
        (out / "tokenizer.json").read_bytes()).hexdigest()
    assert [again.encode(t) for t in SAMPLES] == [tok.encode(t) for t in SAMPLES]
