#!/usr/bin/env python
"""Command line for ``megatron_elastic.study``: run an elastic study, or rebuild its report.

    python tools/elastic_study.py run --spec configs/study/cpu.yaml --jobs 2
    python tools/elastic_study.py report --spec configs/study/cpu.yaml

Exit status: 0 on success, 1 when some runs failed (the others are kept), 2 on a user error.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_elastic.study.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
