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
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to torch")'
"$PY" -m masksub.cli bench "$@"
