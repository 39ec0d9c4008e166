#!/bin/bash
# MaskSub at CPU scale: standard vs MaskSub on every image family, plus DropSub and PathSub on
# the ViT, seeds 0,1,2, one `masksub compare` call per family (the cost ratio is measured in the
# same call). Each run uses one core (threads: 1 in the recipes) at low priority; two lanes run
# side by side on two cores: about 4 hours of wall time (Swin 640 and ConvNeXt 320 epochs are
# the long ones; `--family NAME` runs one comparison).
#
#   bash benchmarks/cpu_evidence.sh            # all of it, into benchmarks/results/cpu-evidence/
#   bash benchmarks/cpu_evidence.sh --resume   # finish the comparisons a stop cut short
#   bash benchmarks/cpu_evidence.sh [--resume] --family vit   # one family's comparison
#   bash benchmarks/cpu_evidence.sh --pilot    # the standard run at doubling lengths: how each length was chosen
#   bash benchmarks/cpu_evidence.sh --longer   # the check: ResNet (no gain at 40 epochs) at 80 and 160 epochs
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

if [ "${1:-}" = "--pilot" ]; then
    # How the length was chosen: the standard run alone, seed 0, at doubling lengths (each its own
    # cosine schedule). A family's length is the shortest L whose 2L run gains under 0.5 points.
    pilot() {  # family epochs...
        local fam=$1
        shift
        for ep in "$@"; do
            SEEDS=0 RESULTS=benchmarks/results/cpu-evidence-pilot compare "$fam-${ep}ep" "fmnist-cpu-$fam" baseline \
                --epochs "$ep" --no-analysis --set eval_every=10
        done
    }
    mkdir -p benchmarks/results/cpu-evidence-pilot
    ( pilot vit 240 480; pilot resnet 80 160; pilot convnext 640 ) &
    ( pilot swin 40 80 160 320 1280; pilot convnext 40 80 160 320 ) &
    wait
    # the 20-epoch runs and the shorter ViT lengths come from the earlier campaign, Swin's 640 from this one
    "$PY" scripts/evidence_table.py --lengths benchmarks/results/cpu-evidence-pilot benchmarks/results/cpu-evidence-20ep \
        "$RESULTS" --readme README.md
    exit 0
fi
if [ "${1:-}" = "--longer" ]; then
    # Is a loss the length's? The family where MaskSub did not help (ResNet, converged at 40 epochs)
    # at 2x and 4x the length, seeds 0, 1, 2, into benchmarks/results/cpu-evidence-other-lengths/
    # (which also keeps the ConvNeXt comparison at 160 epochs, its length before the pilot's 320).
    RESULTS=benchmarks/results/cpu-evidence-other-lengths
    mkdir -p "$RESULTS"
    long() { compare "$1" fmnist-cpu-resnet baseline,masksub --epochs "$2" --no-analysis --set eval_every=10; }
    long resnet-80ep 80 &
    SEEDS=0 long resnet-160ep 160 &
    wait
    SEEDS=1 long resnet-160ep-seed1 160 &  # one folder a seed, side by side: they join resnet-160ep's row
    SEEDS=2 long resnet-160ep-seed2 160 &
    wait
    "$PY" scripts/evidence_table.py "$RESULTS"
    exit 0
fi
family() {  # one family's comparison: every setting and seed in one `masksub compare`
    case $1 in
        vit) compare vit fmnist-cpu-vit baseline,masksub,dropsub,pathsub ;;
        swin) compare swin fmnist-cpu-swin baseline,masksub ;;
        convnext) compare convnext fmnist-cpu-convnext baseline,masksub ;;
        resnet) compare resnet fmnist-cpu-resnet baseline,masksub ;;
        *) echo "cpu_evidence.sh: no family $1 (vit, swin, convnext, resnet)" >&2; return 2 ;;
    esac
}
[ "${1:-}" = "--resume" ] && { RESUME=1; shift; }
if [ "${1:-}" = "--family" ]; then  # one family only, e.g. --family swin
    family "${2:-}"
    exit $?
fi
# two lanes of about the same CPU time, one core each
( family vit ) &
( family swin; family resnet; family convnext ) &
wait
"$PY" scripts/evidence_table.py "$RESULTS"
