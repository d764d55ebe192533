#!/usr/bin/env python
"""Elastic evaluation of a checkpoint: loss / perplexity at every inference k', per-layer budget
and top-p threshold, plus the EMoE expert co-occurrence diagnostic.

    python tools/elastic_eval.py --load runs/emoe/checkpoints [--ks 1-8] [--budgets "4,2;1,4"] \\
        [--top-p 0.5,0.9] [--eval-iters 8] [--output-dir DIR] [section.key=value ...]

Writes ``elastic_eval.txt`` (the printed table), ``elastic_eval.json`` and ``elastic_eval.png``.
The model shape comes from the checkpoint's own ``run_config.yaml`` unless ``--config`` is given.
Implementation: ``megatron_elastic/eval/`` (the method: ``elastic_eval.py``; the command line:
``cli.py``); usage: ``docs/elastic_eval.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_elastic.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
