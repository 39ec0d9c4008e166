#!/bin/bash
# MaskSub at CPU scale: standard vs MaskSub on every image family, plus DropSub and PathSub on
# the ViT, seeds 0,1,2, one `masksub compare` call per family (the cost ratio is measured in the
# same call). Each run uses one core (threads: 1 in the recipes) at low priority; the two lanes
# run side by side, about an hour of wall time on two shared cores.
#
#   bash benchmarks/cpu_evidence.sh            # all of it, into benchmarks/results/cpu-evidence/
#   bash benchmarks/cpu_evidence.sh --resume   # finish the comparisons a stop cut short
#   bash benchmarks/cpu_evidence.sh --longer   # the check: ResNet 40, ViT 60 and 120 epochs instead of 20, seed 0
#   PYTHONPATH=src python scripts/evidence_table.py benchmarks/results/cpu-evidence --readme README.md
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=${PYTHON:-.venv/bin/python}
RESULTS=benchmarks/results/cpu-evidence
SEEDS=0,1,2
mkdir -p "$RESULTS"

compare() {  # folder recipe settings [more compare options]
    local fam=$1 recipe=$2 settings=$3 dir="$RESULTS/$1"
    shift 3
    if [ "${RESUME:-0}" = 1 ] && [ -f "$dir/compare.json" ]; then
        [ -f "$dir/results.json" ] && return 0
        nice -n 15 "$PY" -m masksub.cli compare --resume "$dir" >> "$RESULTS/$fam.log" 2>&1
    else
        nice -n 15 "$PY" -m masksub.cli compare --recipe "$recipe" --settings "$settings" --seeds "$SEEDS" \
            --out "$dir" "$@" > "$RESULTS/$fam.log" 2>&1
    fi
    echo "$fam: exit $?" >> "$RESULTS/lanes.log"
}

if [ "${1:-}" = "--longer" ]; then
    # Are the results the short schedule's? The same comparisons with 2-3x the epochs, seed 0.
    SEEDS=0 compare longer-resnet-40ep fmnist-cpu-resnet baseline,masksub --epochs 40 --no-analysis &
    ( SEEDS=0 compare longer-vit-60ep fmnist-cpu-vit baseline,masksub --epochs 60 --no-analysis
      SEEDS=0 compare longer-vit-120ep fmnist-cpu-vit baseline,masksub --epochs 120 --no-analysis ) &
    wait
    # the 120-epoch ViT again, seeds 1 and 2 side by side
    SEEDS=1 compare longer-vit-120ep-seed1 fmnist-cpu-vit baseline,masksub --epochs 120 --no-analysis &
    SEEDS=2 compare longer-vit-120ep-seed2 fmnist-cpu-vit baseline,masksub --epochs 120 --no-analysis &
    wait
    exit 0
fi
[ "${1:-}" = "--resume" ] && RESUME=1
# two lanes of about the same length, one core each
( compare vit fmnist-cpu-vit baseline,masksub,dropsub,pathsub; compare swin fmnist-cpu-swin baseline,masksub ) &
( compare resnet fmnist-cpu-resnet baseline,masksub; compare convnext fmnist-cpu-convnext baseline,masksub ) &
wait
"$PY" scripts/evidence_table.py "$RESULTS"
