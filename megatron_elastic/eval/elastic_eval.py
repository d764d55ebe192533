"""Elastic evaluation: one checkpoint, many inference budgets.

An elastic MoE is trained so that the number of experts each token activates can be changed
after training. This module measures how well that works: for every inference setting

* a global k' (every MoE layer activates k' experts per token),
* a per-layer budget (``[6, 4, 2, 1]``: one k' per MoE layer, in depth order),
* a top-p threshold (each token takes the smallest k whose router mass reaches p, k in
  [1, num_experts]),

it reports the validation loss, the perplexity exp(loss), the k actually used per layer (measured
from the routing maps) and the EMoE co-occurrence diagnostic. For each MoE layer the expert
co-occurrence matrix is ``M[i, j]`` = share of tokens that activate both expert i and expert j
(``routing_math.expert_cooccurrence``, accumulated over all evaluated tokens). EMoE's
observation is that the distance between the co-activation pattern the model was trained with and
the one an inference k' induces predicts how much quality degrades at k', so every setting gets

* ``cooc_dist``: mean over layers of ``||M(setting) - M(k_train)||_F``, where ``M(k_train)`` is
  evaluation routing at the model's default inference k (the training k for ``fixed``, k_max for
  varying schedules); exactly 0 for the k_train setting itself;
* ``cooc_dist_train``: the same distance to ``M_train``, the co-occurrence of the *training*
  routing (the schedule's k draws and the EMoE candidate-pool sampling, run without gradients on
  the same validation tokens). For plain top-k training the two references coincide.
The implementation is split by job; this module documents the method and keeps the public names
importable from one place:

    settings.py   Setting, parsing k' lists, budgets and top-p thresholds, range checks
    sweep.py      the measurement loop (sweep), on the trainer's evaluation loop
    report.py     the text table, strict JSON and the plot (format_table, write_json, plot)
    cli.py        the command line (main, also ``tools/elastic_eval.py``)
"""

from __future__ import annotations

from megatron_elastic.eval.cli import default_output_dir, main, parse_args, run
from megatron_elastic.eval.report import (
    JSON_NAME,
    PNG_NAME,
    TXT_NAME,
    format_table,
    plot,
    write_json,
    write_outputs,
)
from megatron_elastic.eval.settings import (
    EvalError,
    Setting,
    check_settings,
    default_ks,
    parse_budgets,
    parse_ks,
    parse_top_ps,
)
from megatron_elastic.eval.sweep import SCHEMA_VERSION, sweep

__all__ = [
    "EvalError", "Setting", "parse_ks", "parse_budgets", "parse_top_ps", "default_ks", "check_settings",
    "sweep", "SCHEMA_VERSION", "format_table", "write_json", "plot", "write_outputs", "JSON_NAME", "PNG_NAME",
    "TXT_NAME", "parse_args", "run", "default_output_dir", "main",
]

if __name__ == "__main__":  # python -m megatron_elastic.eval.elastic_eval (docs/elastic_eval.md)
    import sys

    sys.exit(main())
