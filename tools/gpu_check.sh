#!/usr/bin/env bash
# One-command GPU check (see tools/gpu_check.py): tests on the device, bf16 + distributed-optimizer
# training vs fp32, throughput/TFLOP/s/MFU/peak memory, the elastic MoE benchmark; one summary.
#   tools/gpu_check.sh [--out runs/gpu_check]      on a machine with one GPU (< 8 minutes)
#   tools/gpu_check.sh --dry-run                   the same steps on CPU at toy size (CI runs it)
# PYTHON selects the interpreter (default: the repo's .venv if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PYTHON" tools/gpu_check.py "$@"
