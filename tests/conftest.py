"""Session fixtures: a small real corpus, tokenizer and indexed dataset built once per run."""

from __future__ import annotations

import os

import pytest

from helpers import run_tool

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> dict:
    """Corpus from the stdlib -> sentencepiece (vocab 512) -> Megatron .bin/.idx."""
    root = tmp_path_factory.mktemp("smoke_data")
    corpus = root / "corpus.jsonl"
    run_tool("tools/build_corpus.py", "--output", str(corpus), "--max-bytes", "1500000")
    run_tool("tools/train_tokenizer.py", "--input", str(corpus), "--output-prefix", str(root / "spm"),
             "--vocab-size", "512", "--model-type", "bpe")
    run_tool("tools/preprocess_data.py", "--input", str(corpus), "--tokenizer-model", str(root / "spm.model"),
             "--output-prefix", str(root / "corpus"), "--workers", "1", "--no-progress")
    return {
        "root": root,
        "corpus": corpus,
        "tokenizer": root / "spm.model",
        "prefix": str(root / "corpus_text_document"),
    }


@pytest.fixture(scope="module")
def one_process_parallel():
    """World of one (gloo), as the trainer sets it up for one CPU process; torn down after the
    module."""
    from megatron_elastic import parallel
    from megatron_elastic.config import Config

    parallel.destroy()
    parallel.initialize(Config().validate())
    yield
    parallel.destroy()

