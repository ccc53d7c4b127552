#!/usr/bin/env bash
# CIFAR-10 classes 0-2, cpu preset, FIRM and NT-Xent in both loss layouts (concat and pairwise),
# seed 0, on the test split: does the layout change the ranking? (docs/results/cifar10-layouts/)
# Class by class, so that a stopped run leaves whole classes (both layouts) behind; resumable.
# Usage: benchmarks/cpu_layouts.sh DATA_ROOT [OUT_ROOT] [JOBS]
set -euo pipefail
data=${1:?usage: cpu_layouts.sh DATA_ROOT [OUT_ROOT] [JOBS]}
out=${2:-runs}
jobs=${3:-2}
for class in 0 1 2; do
  for mode in concat pairwise; do
    firm bench --dataset cifar10 --data-root "$data" --classes "$class" --losses firm,ntxent --seeds 0 --preset cpu \
      --loss-mode "$mode" --jobs "$jobs" --threads 1 --out "$out/cifar10-layouts" --quiet
  done
done
