#!/usr/bin/env bash
# The GPU evidence in one call: `masksub bench` on ViT-B/16 (eager and compiled), ViT-S/16,
# ViT-L/16, ResNet-50 and Swin-T, then `masksub compare --recipe fashion-mnist` (baseline and
# masksub, seeds 0 and 1, 30 epochs; masking-only and the same-budget row if time allows), under
# a 450 s budget, most valuable first. Results: benchmarks/results/gpu/ (summary.md/json with
# every goal checked, one folder per stage), rewritten after every stage.
#
#     bash benchmarks/gpu_evidence.sh [--budget SECONDS] [--out DIR]   # on a machine with a GPU
#     bash benchmarks/gpu_evidence.sh --archive DIR      # also pack the results into DIR after each stage
#     bash benchmarks/gpu_evidence.sh --stage-data       # copy Debian's Fashion-MNIST into benchmarks/data
#     bash benchmarks/gpu_evidence.sh --rehearsal        # the same stages on CPU, tiny stand-ins
#     bash benchmarks/gpu_evidence.sh --help             # --stages, --summary-only, ...
#
# The logic (plan, time guard, goals, summary, archive) is benchmarks/gpu_evidence.py.
# PYTHON=... picks the interpreter (default: .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_evidence.py "$@"
