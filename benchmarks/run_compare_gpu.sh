#!/usr/bin/env bash
# The accuracy comparison of issue 4 on one GPU, from source: DESIGN.md's Fashion-MNIST recipe
# (30 epochs, bf16), seeds 0 and 1, standard / masking-only / MaskSub, then the same-budget row
# (standard training given the epochs that match MaskSub's measured cost):
#
#     bash benchmarks/run_compare_gpu.sh
#     bash benchmarks/run_compare_gpu.sh --settings baseline,masksub,dropsub,pathsub --seeds 0
#
# Writes benchmarks/results/fashion-mnist-compare/{results.md,results.csv,results.json,*.png}
# and one run directory per setting and seed (metrics.jsonl, config.yaml, summary.json).
# The data set is held on the GPU and augmented there (crop pad 2 + flip).
set -euo pipefail
source "$(dirname "$0")/gpu_python.sh"
OUT=benchmarks/results/fashion-mnist-compare
"$PY" -m masksub.cli compare --recipe fashion-mnist --settings baseline,masking,masksub,samebudget \
    --seeds 0,1 --out "$OUT" --no-progress "$@"
# keep the results folder small: checkpoints stay out of git
find "$OUT" -name '*.pt' -delete
