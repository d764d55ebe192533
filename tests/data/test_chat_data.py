"""Chat data: rendering with the chat template, the assistant-only loss mask, the indexed files and
their sidecar, ChatDataset samples, the loss through train.py's loss path, errors, and (slow) a tiny
training run on chat data."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy
import pytest
import torch

from chat_fixtures import IM_END, IM_START, chat_records, save_chat_tokenizer, write_jsonl
from test_hf_tokenizer_data import _load_tool
from helpers import REPO, run_distributed, tiny_overrides, train_run

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron_elastic.config import ConfigError, load_config
    from megatron_elastic.data.chat import conversation_from_record, encode_conversation, load_chat_template
    from megatron_elastic.data.documents import DataError
    from megatron_elastic.data.tokenizer import load_tokenizer

SEQ = 64


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return save_chat_tokenizer(tmp_path_factory.mktemp("chat_tok") / "tok")


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def chat_prefix(tmp_path_factory, tok_dir) -> str:
    from megatron_elastic.data.chat_preprocess import preprocess_chat

    root = tmp_path_factory.mktemp("chat_data")
    data = write_jsonl(root / "chat.jsonl", chat_records(40))
    return preprocess_chat([data], tok_dir, str(root / "c"), workers=1, progress=False)["prefix"]


def _hf_decode(tok, ids) -> str:
    return tok.hf_tokenizer.decode(list(ids), skip_special_tokens=False)


# -- rendering and masks ----------------------------------------------------------------------------


def test_hand_checked_masks_single_and_multi_turn(tok):
    template = load_chat_template(tok)
    enc = tok.encode
    one = conversation_from_record({"prompt": "hi", "response": "yo"}, "x:1")
    ids, mask = encode_conversation(tok, template, one, "x:1")
    prompt = enc(f"{IM_START}user\nhi{IM_END}\n{IM_START}assistant\n")
    reply = enc(f"yo{IM_END}\n")
    assert ids == prompt + reply and mask == [0] * len(prompt) + [1] * len(reply)
    assert reply[-2] == tok.hf_tokenizer.convert_tokens_to_ids(IM_END)  # end-of-turn carries loss

    two = conversation_from_record({"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"}]}, "x:2")
    ids, mask = encode_conversation(tok, template, two, "x:2")
    segments = [(f"{IM_START}system\nbe brief{IM_END}\n{IM_START}user\na{IM_END}\n{IM_START}assistant\n", 0),
                (f"b{IM_END}\n", 1), (f"{IM_START}user\nc{IM_END}\n{IM_START}assistant\n", 0),
                (f"d{IM_END}\n", 1)]
    assert ids == [i for text, _ in segments for i in enc(text)]
    assert mask == [flag for text, flag in segments for _ in enc(text)]


def test_rendering_round_trips_and_masked_tokens_are_the_replies(tok):
    template = load_chat_template(tok)
    for n, record in enumerate(chat_records(12)):
        messages = conversation_from_record(record, f"r:{n}")
        ids, mask = encode_conversation(tok, template, messages, f"r:{n}")
        assert _hf_decode(tok, ids) == template.render(messages)  # decode(encode) is the rendering
        replies = "".join(f"{m['content']}{IM_END}\n" for m in messages if m["role"] == "assistant")
        assert _hf_decode(tok, [i for i, m in zip(ids, mask) if m]) == replies


def test_sentencepiece_needs_a_template_file(smoke_data, tmp_path):
    spm = load_tokenizer(smoke_data["tokenizer"])
    with pytest.raises(DataError, match="sentencepiece model .* has no chat template: pass --chat-template"):
        load_chat_template(spm)
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}[assistant] {% endif %}")
    template = load_chat_template(spm, path)
    ids, mask = encode_conversation(spm, template, [{"role": "user", "content": "q"},
                                                    {"role": "assistant", "content": "answer"}], "s:1")
    assert spm.decode(ids) == "[user] q\n[assistant] answer\n"
    assert spm.decode([i for i, m in zip(ids, mask) if m]) == "answer\n"


@pytest.mark.parametrize("record, message", [
    ({"text": "x"}, "a conversation needs 'messages' .* or 'prompt' and 'response' \\(keys present: 'text'\\)"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages\\[0\\] has role 'bot'; allowed: system, user, assistant"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages\\[0\\].content is int, expected a string"),
    ({"messages": [{"role": "user", "content": "q"}]}, "the conversation has no assistant message"),
    ({"prompt": "q", "response": None}, "'response' is NoneType"),
])
def test_bad_conversations_name_the_line(record, message):
    with pytest.raises(DataError, match="f.jsonl:7: " + message):
        conversation_from_record(record, "f.jsonl:7")


def test_template_that_rewrites_earlier_turns_is_refused(tok):
    # Marks the last message: every earlier rendering differs from the full conversation's.
    template = load_chat_template(tok)
    unstable = type(template)("{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}"
                              "{% endfor %}", "unstable", tok)
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(DataError, match="x:3: .*renders assistant message 1 differently.*split the conversation"):
        encode_conversation(tok, unstable, messages, "x:3")


def test_template_errors_name_the_line(tok):
    template = load_chat_template(tok)
    strict = type(template)("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
                            "{% for m in messages %}{{ m['content'] }}{% endfor %}", "strict", tok)
    with pytest.raises(DataError, match=r"x:4: the chat template of strict cannot render the conversation "
                                        r"\(TemplateError: user first\)"):
        encode_conversation(tok, strict, [{"role": "system", "content": "s"},
                                          {"role": "assistant", "content": "a"}], "x:4")


# -- the files ------------------------------------------------------------------------------------


def test_preprocessed_files_hold_tokens_and_mask_with_the_same_documents(chat_prefix, tok):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens, mask = IndexedDataset(chat_prefix), IndexedDataset(chat_prefix + ".loss_mask")
    assert len(tokens) == len(mask) == 40
    template = load_chat_template(tok)
    for n, record in enumerate(chat_records(40)[:5]):
        ids, flags = encode_conversation(tok, template, conversation_from_record(record, "-"), "-")
        assert tokens[n].tolist() == ids and mask[n].tolist() == flags and mask[n].dtype == numpy.uint8
    meta = json.loads(Path(chat_prefix + ".meta.json").read_text())
    assert meta["dataset_type"] == "chat" and meta["documents"] == 40
    assert meta["assistant_tokens"] == int(sum(mask[i].sum() for i in range(40)))
    assert meta["chat_template_sha256"] == load_chat_template(tok).sha256


def test_cli_output_does_not_depend_on_workers_and_errors_leave_nothing(tmp_path, tok_dir, capsys):
    preprocess_data = _load_tool("preprocess_data")
    data = write_jsonl(tmp_path / "c.jsonl", chat_records(30))
    outs = []
    for workers in (1, 2):
        argv = ["--chat", "--input", str(data), "--tokenizer-model", str(tok_dir), "--output-prefix",
                str(tmp_path / f"w{workers}"), "--workers", str(workers), "--chunk-lines", "7", "--no-progress"]
        assert preprocess_data.main(argv) == 0
        outs.append([Path(f"{tmp_path}/w{workers}_chat_document{s}").read_bytes()
                     for s in (".bin", ".idx", ".loss_mask.bin", ".loss_mask.idx")])
    assert outs[0] == outs[1]
    assert "30 conversations" in capsys.readouterr().out

    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text() + json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    argv = ["--chat", "--input", str(bad), "--tokenizer-model", str(tok_dir), "--output-prefix",
            str(tmp_path / "bad"), "--no-progress"]
    assert preprocess_data.main(argv) == 2
    assert "bad.jsonl:31: the conversation has no assistant message" in capsys.readouterr().err
    assert not list(tmp_path.glob("bad_*")) and not list(tmp_path.glob(".bad_*"))


# -- datasets and the loss --------------------------------------------------------------------------


def _cfg(prefix, tok_dir, *extra):
    return load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(
        {"prefix": prefix, "tokenizer": tok_dir}, Path("."), **{"model.seq_length": SEQ}) + list(extra))


def test_chat_samples_shift_the_mask_with_the_labels_and_count_truncation(chat_prefix, tok_dir, tok, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_elastic.data.chat_dataset import ChatDataset
    from megatron_elastic.data.datasets import build_datasets

    train, valid, _ = build_datasets(_cfg(chat_prefix, tok_dir), tok, 1)
    assert isinstance(train, ChatDataset) and len(valid) == 4  # one pass over 10% of 40
    tokens, mask = IndexedDataset(chat_prefix), IndexedDataset(chat_prefix + ".loss_mask")
    long = 0
    for idx in range(len(train.sample_index[:40])):
        doc = int(train.sample_index[idx])
        sample, ids, flags = train[idx], tokens[doc].astype(numpy.int64), mask[doc]
        n = min(len(ids), SEQ + 1) - 1
        long += len(ids) > SEQ + 1
        assert sample["tokens"][:n].tolist() == ids[:n].tolist()
        assert sample["labels"][:n].tolist() == ids[1:n + 1].tolist()
        assert sample["loss_mask"][:n].tolist() == flags[1:n + 1].astype(float).tolist()
        assert not sample["loss_mask"][n:].any() and (sample["tokens"][n:] == tok.pad).all()
        assert sample["padding_mask"].tolist() == [j >= n for j in range(SEQ)]
        assert sample["position_ids"].tolist() == list(range(SEQ))
    assert long > 0  # the data has conversations longer than the window
    out = capsys.readouterr().out
    lengths = tokens.sequence_lengths[train.indices]
    assert f"{len(train.indices)} conversations, {int((lengths > SEQ + 1).sum())} longer than seq_length+1=65" in out


def test_prompt_targets_do_not_change_the_loss_and_reply_targets_do(chat_prefix, tok_dir, tok, one_process_parallel):
    """Through the training step's loss (training/schedule.masked_mean_loss on the model's
    per-token losses): the loss is a function of the reply targets only."""
    from megatron_elastic.data.datasets import BatchReader, build_datasets
    from megatron_elastic.models.gpt import build_model
    from megatron_elastic.training.schedule import masked_mean_loss

    def loss_from_batch(model, batch):
        per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return masked_mean_loss(per_token, batch["loss_mask"])

    cfg = _cfg(chat_prefix, tok_dir)
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size)
    batch = BatchReader(build_datasets(cfg, tok, 1)[0], 2, 2, 0, 1).get(0, 0)
    mask = batch["loss_mask"].bool()
    assert mask.any() and (~mask).any()
    with torch.no_grad():
        base = loss_from_batch(model, batch)
        prompt = dict(batch, labels=torch.where(mask, batch["labels"], (batch["labels"] + 7) % tok.vocab_size))
        assert torch.equal(loss_from_batch(model, prompt), base)
        reply = batch["labels"].clone()
        j = mask.nonzero()[0].tolist()
        reply[j[0], j[1]] = (reply[j[0], j[1]] + 7) % tok.vocab_size
        assert not torch.equal(loss_from_batch(model, dict(batch, labels=reply)), base)


def test_padding_is_left_out_of_the_router_losses(chat_prefix, tok_dir, tok, one_process_parallel):
    """The training forward (PipelineStep) hands chat padding to Megatron's MoE routing: with
    aux loss, z-loss and the hierarchical router loss on, the router's gradients do not depend
    on what the padded positions hold. Without the mask (the model called bare) they do."""
    from megatron_elastic.data.datasets import BatchReader, build_datasets
    from megatron_elastic.models.gpt import build_model
    from megatron_elastic.moe.router import elastic_routers
    from megatron_elastic.training.schedule import PipelineStep, masked_mean_loss

    cfg = _cfg(chat_prefix, tok_dir, "model.moe_aux_loss_coeff=0.01", "model.moe_z_loss_coeff=0.001",
               "elastic.router_loss_coeff=0.1")
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size).train()
    reader = BatchReader(build_datasets(cfg, tok, 1)[0], 2, 2, 0, 1)
    batch = next(b for b in (reader.get(it, 0) for it in range(18)) if b["padding_mask"].any())
    pad = batch["padding_mask"]
    other = dict(batch, tokens=torch.where(pad, (batch["tokens"] + 5) % tok.vocab_size, batch["tokens"]))

    class OneBatch:
        mbs = 2

        def __init__(self, b):
            self.b = b

        def get(self, iteration, microbatch):
            return self.b

        def sample_offset(self, microbatch):
            return 0

    def router_grads(b, through_schedule: bool):
        model.zero_grad(set_to_none=True)
        if through_schedule:
            per_token, _ = PipelineStep(model, OneBatch(b))._forward(0, None, iter([0]), model)
        else:
            model.elastic_context.set(0, 0, 0)
            per_token = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        masked_mean_loss(per_token, b["loss_mask"]).backward()
        return torch.cat([r.weight.grad.flatten() for r in elastic_routers(model)])

    masked = (router_grads(batch, True) - router_grads(other, True)).abs().max().item()
    bare = (router_grads(batch, False) - router_grads(other, False)).abs().max().item()
    assert masked < 1e-7 < 1e-5 < bare, (masked, bare)


def test_chat_and_text_prefixes_do_not_mix(chat_prefix, tok_dir, tok, tmp_path):
    from megatron_elastic.data.datasets import build_datasets
    from megatron_elastic.data.preprocess import preprocess

    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "some text " * 20}] * 10)
    text_prefix = preprocess([text], tok_dir, str(tmp_path / "t"), progress=False)["prefix"]
    with pytest.raises(ConfigError, match="chat and text data in one run .*is chat data.*is text"):
        build_datasets(_cfg(chat_prefix, tok_dir, f"data.data_path=[1,{chat_prefix},1,{text_prefix}]"), tok, 1)
    with pytest.raises(ConfigError, match="chat and text data in one run"):
        build_datasets(_cfg(chat_prefix, tok_dir, f"data.valid_data_path=[{text_prefix}]"), tok, 1)
    with pytest.raises(ConfigError, match="data.dataset_type=chat but .* is text data.*--chat"):
        build_datasets(_cfg(text_prefix, tok_dir, "data.dataset_type=chat"), tok, 1)
    with pytest.raises(ConfigError, match="data.dataset_type=text but .* is chat data"):
        build_datasets(_cfg(chat_prefix, tok_dir, "data.dataset_type=text"), tok, 1)
    with pytest.raises(ConfigError, match="data.dataset_type='chats' must be text, chat or null"):
        _cfg(chat_prefix, tok_dir, "data.dataset_type=chats")


def test_trainer_refuses_a_chat_text_mix_before_building_the_model(chat_prefix, tok_dir, tmp_path, monkeypatch, capsys):
    from megatron_elastic import train
    from megatron_elastic.data.preprocess import preprocess
    from megatron_elastic.models import gpt

    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "some text " * 20}] * 10)
    text_prefix = preprocess([text], tok_dir, str(tmp_path / "t"), progress=False)["prefix"]

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(gpt, "build_model_chunks", no_model)
    overrides = tiny_overrides({"prefix": chat_prefix, "tokenizer": tok_dir}, tmp_path / "run",
                               **{"model.seq_length": SEQ}) + [f"data.valid_data_path=[{text_prefix}]"]
    rc = train.main(["--config", str(REPO / "configs" / "smoke.yaml"), *overrides])
    assert rc == 2 and "chat and text data in one run" in capsys.readouterr().err


def test_missing_or_foreign_mask_files_are_named(chat_prefix, tok_dir, tok, tmp_path):
    import shutil

    from megatron_elastic.data.datasets import build_datasets

    copy = str(tmp_path / "c_chat_document")
    for suffix in (".bin", ".idx", ".meta.json", ".loss_mask.bin"):
        shutil.copyfile(chat_prefix + suffix, copy + suffix)
    with pytest.raises(ConfigError, match=r"is chat data but .*loss_mask.idx is missing"):
        build_datasets(_cfg(copy, tok_dir), tok, 1)
    # A mask from other data: one document short.
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    source = IndexedDataset(chat_prefix + ".loss_mask")
    builder = IndexedDatasetBuilder(copy + ".loss_mask.bin", dtype=numpy.uint8)
    for i in range(len(source) - 1):
        builder.add_document(source[i], [len(source[i])])
    builder.finalize(copy + ".loss_mask.idx")
    with pytest.raises(ConfigError, match="does not have the token data's documents \\(39 vs 40"):
        build_datasets(_cfg(copy, tok_dir), tok, 1)


@pytest.mark.slow
def test_tiny_training_run_on_chat_data_lowers_the_reply_loss(chat_prefix, tok_dir, tmp_path):
    overrides = tiny_overrides({"prefix": chat_prefix, "tokenizer": tok_dir}, tmp_path, **{
        "model.seq_length": SEQ, "train.train_iters": 30, "train.lr": 3e-3, "train.eval_iters": 2})
    (result,) = run_distributed(train_run, 1, overrides, tmp_dir=tmp_path)
    losses = result["losses"]
    assert result["iteration"] == 30 and all(numpy.isfinite(losses))
    assert numpy.mean(losses[-5:]) < numpy.mean(losses[:5]) - 0.5
    assert result["valid"] is not None and numpy.isfinite(result["valid"])
