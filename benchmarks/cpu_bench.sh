#!/usr/bin/env bash
# The cpu-preset benchmark committed under docs/results/: CIFAR-10 and Fashion-MNIST, all 10
# classes, FIRM / NT-Xent / Rot-SupCon, seed 0. About 3 hours per dataset on a 2-core CPU.
# --warmup 0.3: the cpu preset's warm-up when those figures were made (2026-11-28); the preset now
# uses 1 % (docs/results/cpu_preset_tuning.md) and benchmarks/cpu_evidence.sh runs the new grids.
# Usage: benchmarks/cpu_bench.sh DATA_ROOT [OUT_ROOT]
set -euo pipefail
data=${1:?usage: cpu_bench.sh DATA_ROOT [OUT_ROOT]}
out=${2:-runs}
for dataset in cifar10 fashionmnist; do
  firm bench --dataset "$dataset" --data-root "$data" --losses firm,ntxent,rotsupcon --seeds 0 --preset cpu --warmup 0.3 \
    --out "$out/bench-$dataset-cpu" --quiet
done
