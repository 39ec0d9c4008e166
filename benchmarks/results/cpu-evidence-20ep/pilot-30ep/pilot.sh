#!/bin/bash
# The pilot that chose the CPU-evidence length: the standard run of two families, 30 epochs,
# test top-1 every 3 epochs on the first 2,000 test images (the recipes then had 20 epochs).
cd "$(dirname "$0")/../../../.."
export PYTHONPATH=$PWD/src OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
M() { nice -n 15 .venv/bin/python -c "import sys; from masksub.cli import main; sys.exit(main(sys.argv[1:]))" "$@"; }
run() { M train --recipe fmnist-cpu-$1 --sub none --epochs 30 --set eval_every=3 --set val_subset=2000 --set tensorboard=false --output benchmarks/results/cpu-evidence-20ep/pilot-30ep --run-name $1 --overwrite > benchmarks/results/cpu-evidence-20ep/pilot-30ep/$1.log 2>&1; }
run vit &
run resnet &
wait
