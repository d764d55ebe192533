"""Evaluation of trained elastic MoE checkpoints.

elastic_eval -- validation loss / perplexity of one checkpoint at every inference k', per-layer
                budgets and top-p thresholds, with the expert co-occurrence diagnostic (the method
                and the public names); implemented in settings (what to measure), sweep (the
                measurement loop), report (table, JSON, plot) and cli (the command line,
                ``tools/elastic_eval.py``).
"""
