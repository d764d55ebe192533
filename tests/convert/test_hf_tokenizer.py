"""The exported tokenizer (convert/hf_tokenizer.py): lossless, and the ids training used."""

from __future__ import annotations

from helpers import REPO


def test_exported_tokenizer_is_lossless_and_matches_training_ids(smoke_data, tmp_path):
    from transformers import AutoTokenizer

    from megatron_elastic.convert.hf_tokenizer import save_hf_tokenizer
    from megatron_elastic.data.tokenizer import SentencePieceTokenizer

    special = save_hf_tokenizer(smoke_data["tokenizer"], tmp_path)
    assert (special["bos"], special["eos"], special["pad"]) == (1, 2, 3)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    ours = SentencePieceTokenizer(smoke_data["tokenizer"])
    texts = [p.read_text() for p in sorted((REPO / "megatron_elastic").rglob("*.py"))[:12]]
    texts += [
        "def f(x):\n\tif x:\n        return 1234567890  \n\n\n  r\u00e9sum\u00e9 \u4e16\u754c \U0001f642\r\n x\x00 \t end",
        "  leading and trailing whitespace   ", "<s>html strike</s> and <pad> are just text",
    ]
    for text in texts:
        if "\u2581" in text:
            continue  # the one documented exception (docs/hf_conversion.md)
        ids = hf.encode(text)
        assert hf.decode(ids) == text
        assert ids == ours.encode(text)  # the ids the model was trained on; no BOS added
    assert hf.decode(hf.encode("a\u2581b")) == "a b"  # sentencepiece's space marker, as documented
