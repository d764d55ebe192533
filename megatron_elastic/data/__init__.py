"""Data tooling: the tokenizer wrapper used by training and by ``tools/preprocess_data.py``.

The tokenizer is not re-exported here on purpose: importing it pulls in ``megatron.core`` (several
seconds), and code that only needs, say, the corpus builder should not pay for that.
"""
