"""megatron_elastic.data.datasets without a training run: which samples ``BatchReader`` reads for
each (iteration, micro-batch, data-parallel rank), blend parsing, the model's vocabulary size and
the vocabulary check against a dataset's ``.meta.json`` record. Hand-computed values throughout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_elastic.config import Config, ConfigError
from megatron_elastic.data.datasets import BatchReader, check_vocabulary, model_vocab_size, parse_blend


class Samples:
    """A dataset of ``n`` samples; sample ``i`` holds ``i`` in every position (numpy, like
    GPTDataset's tokens, or torch, like its other fields)."""

    def __init__(self, n: int, seq: int = 3):
        self.n, self.seq = n, seq

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        assert 0 <= i < self.n, i
        return {
            "tokens": np.full(self.seq, i, dtype=np.int64),
            "labels": torch.full((self.seq,), i + 1000),
            "loss_mask": torch.ones(self.seq),
            "position_ids": torch.arange(self.seq),
        }


def sample_ids(batch: dict) -> list:
    return batch["tokens"][:, 0].tolist()


# ----------------------------------------------------------------------------- BatchReader
def test_sample_offsets_follow_megatrons_sampler_order():
    # G = 12, b = 2, D = 3: two micro-batches per rank; micro-batch m of rank r starts at 6m + 2r.
    readers = [BatchReader(Samples(100), 2, 12, dp_rank=r, dp_size=3) for r in range(3)]
    assert [reader.num_microbatches for reader in readers] == [2, 2, 2]
    assert [[reader.sample_offset(m) for m in range(2)] for reader in readers] == [[0, 6], [2, 8], [4, 10]]


def test_micro_batches_address_iteration_microbatch_and_rank():
    readers = [BatchReader(Samples(100), 2, 12, dp_rank=r, dp_size=3) for r in range(3)]
    # iteration 1, micro-batch 1, rank 2: 1*12 + 1*(2*3) + 2*2 = 22 -> samples 22, 23
    assert sample_ids(readers[2].get(1, 1)) == [22, 23]
    assert sample_ids(readers[0].get(0, 0)) == [0, 1]
    assert sample_ids(readers[1].get(3, 0)) == [38, 39]
    # Every sample of an iteration is read exactly once across ranks and micro-batches.
    for iteration in range(4):
        seen = sorted(i for reader in readers for m in range(2) for i in sample_ids(reader.get(iteration, m)))
        assert seen == list(range(12 * iteration, 12 * iteration + 12))


def test_one_rank_reads_what_the_whole_dp_group_reads_per_iteration():
    """D = 1 with 6 micro-batches of 2 covers the same 12 samples as D = 3 with 2 each."""
    single = BatchReader(Samples(100), 2, 12, dp_rank=0, dp_size=1)
    assert single.num_microbatches == 6
    assert [i for m in range(6) for i in sample_ids(single.get(2, m))] == list(range(24, 36))


def test_batch_fields_are_stacked_tensors_and_indices_wrap():
    reader = BatchReader(Samples(25, seq=3), 2, 12, dp_rank=0, dp_size=1)
    batch = reader.get(2, 0)  # samples 24, 25 -> 24, 0 (modulo the dataset length)
    assert sample_ids(batch) == [24, 0]
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert all(isinstance(v, torch.Tensor) and v.shape == (2, 3) for v in batch.values())
    assert batch["tokens"].dtype == torch.int64
    assert batch["labels"][:, 0].tolist() == [1024, 1000]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]


def test_empty_split_is_a_config_error():
    with pytest.raises(ConfigError, match="a dataset split is empty.*data.split"):
        BatchReader(None, 2, 12, dp_rank=0, dp_size=1)


# ----------------------------------------------------------------------------- blend parsing
@pytest.fixture
def prefixes(tmp_path):
    out = []
    for name in ("a_text_document", "b_text_document"):
        prefix = tmp_path / name
        for ext in (".bin", ".idx"):
            (tmp_path / f"{name}{ext}").write_bytes(b"")
        out.append(str(prefix))
    return out


def test_parse_blend_forms(prefixes):
    a, b = prefixes
    assert parse_blend([a]) == ([a], None)
    assert parse_blend([a, b]) == ([a, b], None)
    assert parse_blend([0.3, a, 0.7, b]) == ([a, b], [0.3, 0.7])
    assert parse_blend(["0.25", a, "1", b]) == ([a, b], [0.25, 1.0])  # YAML / override strings
    # Odd length: not a weighted blend, so every item is a prefix (and must exist).
    with pytest.raises(ConfigError, match=r"data.data_path: 0.5.bin not found"):
        parse_blend([0.5, a, b])


def test_parse_blend_errors_name_the_missing_file(prefixes, tmp_path):
    with pytest.raises(ConfigError, match="data.data_path is empty"):
        parse_blend([])
    (tmp_path / "b_text_document.idx").unlink()
    with pytest.raises(ConfigError, match=rf"{prefixes[1]}\.idx not found on this node"):
        parse_blend([1, prefixes[0], 1, prefixes[1]])


# ----------------------------------------------------------------------------- vocabulary
def _cfg(*overrides: str) -> Config:
    return Config().apply_overrides(list(overrides))


def test_model_vocab_size_pads_the_tokenizer_size():
    assert model_vocab_size(_cfg("model.vocab_size=3000"), 1000) == 3000
    # padded to a multiple of make_vocab_size_divisible_by x tensor-parallel size
    assert model_vocab_size(_cfg("model.make_vocab_size_divisible_by=128"), 1000) == 1024
    assert model_vocab_size(_cfg("model.make_vocab_size_divisible_by=128"), 1024) == 1024
    cfg = _cfg("model.make_vocab_size_divisible_by=128", "parallel.tensor_model_parallel_size=2")
    assert model_vocab_size(cfg, 1025) == 1280


class _Tokenizer:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size


def _write_dataset(prefix, docs, max_id_record=None):
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_elastic.data.meta import write_meta

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(1024))
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=np.uint16), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    if max_id_record is not None:
        write_meta(str(prefix), max_token_id=max_id_record, vocab_size=1024, tokenizer_model="t.model",
                   tokenizer_sha256="x", documents=len(docs), tokens=sum(map(len, docs)))


def test_check_vocabulary(tmp_path):
    prefix = tmp_path / "d_text_document"
    _write_dataset(prefix, [[1, 2, 300], [7]], max_id_record=300)
    base = [f"data.data_path=[{prefix}]", "data.tokenizer_model=t.model"]
    # ids 0..300 fit 512 rows (256 tokenizer pieces padded to model.vocab_size=512)
    assert check_vocabulary(_cfg(*base, "model.vocab_size=512"), _Tokenizer(256)) == 512
    with pytest.raises(ConfigError, match=r"holds token id 300 \(per .*meta.json.*1024 pieces\) but the "
                                          r"model vocabulary has 300 entries \(ids 0\.\.299\)"):
        check_vocabulary(_cfg(*base, "model.vocab_size=300"), _Tokenizer(256))
    with pytest.raises(ConfigError, match="has 600 pieces but model.vocab_size=512"):
        check_vocabulary(_cfg(*base, "model.vocab_size=512"), _Tokenizer(600))


# ----------------------------------------------------------------------------- held-out sets
def test_separate_valid_and_test_data_do_not_depend_on_the_training_run(smoke_data):
    """data.valid_data_path: validation samples are fixed by data.valid_seed alone, so runs with
    another train.seed, length or eval interval score the same tokens; training uses all of
    data_path."""
    from megatron_elastic.data.datasets import build_datasets
    from megatron_elastic.data.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(str(smoke_data["tokenizer"]))
    prefix = smoke_data["prefix"]

    def build(*overrides):
        cfg = _cfg("model.seq_length=32", f"data.data_path=[{prefix}]", f"data.valid_data_path=[{prefix}]",
                   f"data.test_data_path=[{prefix}]", f"data.tokenizer_model={smoke_data['tokenizer']}",
                   "data.split=90,10,0", *overrides).validate()
        return build_datasets(cfg, tok, 1)

    def first_tokens(ds, n=6):
        return [ds[i]["tokens"][:8].tolist() for i in range(n)]

    train_a, valid_a, test_a = build("train.seed=1", "train.train_iters=10", "train.eval_interval=5")
    train_b, valid_b, test_b = build("train.seed=2", "train.train_iters=30", "train.eval_interval=0")
    assert first_tokens(valid_a) == first_tokens(valid_b) and len(valid_a) == len(valid_b)
    assert first_tokens(test_a) == first_tokens(test_b)
    assert first_tokens(train_a) != first_tokens(train_b)  # the training order follows train.seed
    # data.split is not applied: the validation set is the whole held-out data set, once.
    assert len(valid_a) == len(test_a)
    _, valid_c, _ = build("data.valid_seed=7")
    assert first_tokens(valid_c) != first_tokens(valid_a) and len(valid_c) == len(valid_a)


def test_held_out_paths_are_checked():
    with pytest.raises(ConfigError, match="data.test_data_path needs data.valid_data_path"):
        _cfg("data.test_data_path=[x]").validate()
    # One prefix given as a string is read as a one-element list, like data.data_path.
    assert _cfg("data.valid_data_path=x").data.valid_data_path == ["x"]
