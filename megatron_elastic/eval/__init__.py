"""Evaluation of trained elastic MoE checkpoints.

elastic_eval -- validation loss / perplexity of one checkpoint at every inference k', per-layer
                budgets and top-p thresholds, with the expert co-occurrence diagnostic; table,
                JSON and plot writers. The command line is ``tools/elastic_eval.py``.
"""
