#!/usr/bin/env bash
# The runs behind results/ and the README's tables (about five hours on a 2-core CPU machine
# without a GPU, two trials at a time). Usage: benchmarks/reproduce.sh [DATA_DIR] [RESULTS_DIR]
# An interrupted run continues with the same command plus --name RUN --resume (raycnn prints it).
set -euo pipefail
data=${1:-data}
out=${2:-my-results}     # results/ holds the committed runs, and raycnn never overwrites a run
raycnn=${RAYCNN:-raycnn}
# DATA_DIR: a torchvision-layout root (MNIST/raw, cifar-10-batches-py); where files are missing,
# raycnn downloads them, or says in one line which files to put where.
# Sec. 4: the nine hand-built CIFAR-10 trials at the report's 30 epochs.
$raycnn run cifar10 --filter 'cifar10/base/*' --filter 'cifar10/augment/*' --filter 'cifar10/dropout/*' \
  --filter 'cifar10/batchnorm/*' --data-dir "$data" --results-dir "$out" --name cifar10-handbuilt-30ep
# Sec. 3: all 40 MNIST trials for one epoch, then the four optimizers of the base net at lr 0.001 for 10.
$raycnn run mnist --epochs 1 --data-dir "$data" --results-dir "$out" --name mnist-all-1ep
$raycnn run mnist --filter 'mnist/base/*/lr0.001' --data-dir "$data" --results-dir "$out" --name mnist-base-lr0.001-10ep
# The cells more than 3 points off the report, again with three seeds (seed 0 repeats the run above).
$raycnn run cifar10 --filter 'cifar10/augment/jitter' --filter 'cifar10/dropout/scheduler' --repeats 3 \
  --data-dir "$data" --results-dir "$out" --name cifar10-repeats-30ep
$raycnn run mnist --filter 'mnist/base/adamw/lr0.01' --data-dir "$data" --results-dir "$out" --name mnist-base-adamw-lr0.01-10ep
$raycnn run mnist --filter 'mnist/base/adamw/lr0.01' --epochs 1 --repeats 3 --data-dir "$data" --results-dir "$out" \
  --name mnist-base-adamw-lr0.01-repeats-1ep
for run in cifar10-handbuilt-30ep mnist-all-1ep mnist-base-lr0.001-10ep cifar10-repeats-30ep \
    mnist-base-adamw-lr0.01-10ep mnist-base-adamw-lr0.01-repeats-1ep; do
  $raycnn plot "$out/$run" >/dev/null
done
