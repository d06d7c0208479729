#!/usr/bin/env bash
# The runs behind results/ and the README's tables, two trials at a time (their trials add up to
# about 52 trial-hours on a 2-core CPU machine without a GPU, the published runs' wall_seconds
# summed: at least 26 hours of wall time).
# Usage: benchmarks/reproduce.sh [DATA_DIR] [RESULTS_DIR]
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
# The Color Jitter cell with torchvision's ColorJitter, as the report ran it (a study, not a suite).
$raycnn run benchmarks/studies/cifar10-jitter-faithful.toml --repeats 3 --seed 0 --data-dir "$data" \
  --results-dir "$out" --name cifar10-jitter-faithful-30ep --cpus-per-trial 1 --max-concurrent 2
# Sec. 3 at the report's 10 epochs, in chunks (fp32, one thread per trial, two at a time: the
# packing benchmarks/roofline.py picks on a 2-core CPU).
$raycnn run mnist --filter 'mnist/dropout/*' --filter 'mnist/stride2/*' --filter mnist/base/sgd/lr0.01 \
  --filter mnist/base/sgd-momentum/lr0.01 --filter mnist/base/adam/lr0.01 --precision fp32 \
  --data-dir "$data" --results-dir "$out" --name mnist-grid-10ep-a
$raycnn run mnist --filter 'mnist/batchnorm/*' --filter 'mnist/kernel5/*' --precision fp32 \
  --data-dir "$data" --results-dir "$out" --name mnist-grid-10ep-c
# Seeds 1 and 2 of the three MNIST cells more than 3 points off at 10 epochs (seed 0 is above).
$raycnn run mnist --filter mnist/dropout/adam/lr0.01 --filter mnist/dropout/adamw/lr0.01 \
  --filter mnist/base/adamw/lr0.01 --seed 1 --repeats 2 --precision fp32 \
  --data-dir "$data" --results-dir "$out" --name mnist-grid-10ep-d
# Sec. 4.3: AlexNet and ResNet-18 from scratch at the report's 30 epochs (hours each on one core).
$raycnn run cifar10 --filter cifar10/resnet18 --filter cifar10/alexnet --precision fp32 \
  --data-dir "$data" --results-dir "$out" --name cifar10-grid-30ep-e
# Seeds 1 and 2 of ResNet-18 from scratch, more than 3 points off the report (seed 0 is above).
$raycnn run cifar10 --filter cifar10/resnet18 --seed 1 --repeats 2 --precision fp32 \
  --data-dir "$data" --results-dir "$out" --name cifar10-grid-30ep-f
# Seeds 1 and 2 of AlexNet from scratch, more than 3 points off the report (seed 0 is above).
$raycnn run cifar10 --filter cifar10/alexnet --seed 1 --repeats 2 --precision fp32 \
  --data-dir "$data" --results-dir "$out" --name cifar10-grid-30ep-g
# The precision check: fp32 against bf16 autocast, seeds 0-2, on one MNIST and one CIFAR-10 cell.
for p in fp32 bf16; do
  $raycnn run all --filter mnist/base/sgd-momentum/lr0.01 --filter cifar10/base/scheduler --repeats 3 \
    --precision $p --data-dir "$data" --results-dir "$out" --name precision-$p
done
for run in cifar10-handbuilt-30ep mnist-all-1ep mnist-base-lr0.001-10ep cifar10-repeats-30ep \
    mnist-base-adamw-lr0.01-10ep mnist-base-adamw-lr0.01-repeats-1ep cifar10-jitter-faithful-30ep \
    mnist-grid-10ep-a mnist-grid-10ep-c mnist-grid-10ep-d cifar10-grid-30ep-e cifar10-grid-30ep-f cifar10-grid-30ep-g precision-fp32 precision-bf16; do
  $raycnn plot "$out/$run" >/dev/null
done
