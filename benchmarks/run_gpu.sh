#!/usr/bin/env bash
# The step-cost benchmark of issue 5 on one GPU (H100 / H200), from source:
#
#     bash benchmarks/run_gpu.sh                 # the default plan, est. 6-10 minutes (not yet timed)
#     bash benchmarks/run_gpu.sh --models vit_b --compile both   # any other plan: bench flags
#
# Writes benchmarks/results/<date>_<gpu>.json (every row, the breakdown, the goals) and .txt
# (the table that is also printed). Needs torch with CUDA and timm; no download (random
# weights and data). PYTHON=... picks the interpreter (default: .venv/bin/python, else python3).
set -euo pipefail
source "$(dirname "$0")/gpu_python.sh"
"$PY" -m masksub.cli bench "$@"
