#!/usr/bin/env python
"""Per-layer inference budget search for an elastic MoE checkpoint (see
``megatron_elastic/eval/budget_cli.py``).

    python tools/search_budget.py --load runs/smoke/checkpoints --mean-k 1.5,2.5

Exit status: 0 on success, 2 on a user error (one line on stderr).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_elastic.eval.budget_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
