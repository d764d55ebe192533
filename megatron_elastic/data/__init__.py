"""Data: reading documents, building corpora, tokenizers, Megatron .bin/.idx, training datasets.

One job per module:

* ``documents``  -- the jsonl/text reader every tool uses, and ``DataError`` (stdlib only);
* ``corpus``     -- a jsonl corpus from the Python standard library's sources (stdlib only);
* ``tokenizer_training`` -- training a lossless sentencepiece model;
* ``tokenizer``  -- ``load_tokenizer`` (a .model file or a Hugging Face directory) and the
  sentencepiece wrapper megatron-core's datasets accept;
* ``huggingface_tokenizer`` -- a Hugging Face tokenizer directory, through megatron-core's own;
* ``preprocess`` -- documents -> Megatron ``.bin``/``.idx`` (+ the ``.meta.json`` record);
* ``meta``       -- that record, and the sampled token-range check for data without one;
* ``chat``       -- conversations -> token ids + assistant-only loss mask via the chat template;
* ``chat_preprocess`` -- chat jsonl -> token and loss-mask ``.bin``/``.idx`` (+ ``.meta.json``);
* ``chat_dataset`` -- that layout on disk, ``ChatDataset`` (one conversation per sequence);
* ``datasets``   -- training datasets, addressed micro-batches, blend parsing, vocabulary checks.

Nothing is re-exported here on purpose: several modules import ``megatron.core`` (seconds), and
code that only needs, say, the corpus builder should not pay for that.
"""
