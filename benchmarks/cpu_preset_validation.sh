#!/usr/bin/env bash
# Re-validate the cpu preset's warm-up share and loss layout on validation splits of the CIFAR-10
# *training* set (held-out normal images + images of other classes; the test split is never read):
# class 0 (airplane) x FIRM / NT-Xent x warm-up {0.01, 0.3} x layout {concat, pairwise}, seed 0.
# Only the final cos1 AUROC is needed to choose, so the other scorers are skipped.
# Usage: benchmarks/cpu_preset_validation.sh DATA_ROOT [OUT_ROOT] [JOBS]
set -euo pipefail
data=${1:?usage: cpu_preset_validation.sh DATA_ROOT [OUT_ROOT] [JOBS]}
out=${2:-runs}
jobs=${3:-2}
for warmup in 0.01 0.3; do
  for mode in concat pairwise; do
    firm bench --dataset cifar10 --data-root "$data" --split validation --classes 0 --losses firm,ntxent \
      --seeds 0 --preset cpu --warmup "$warmup" --loss-mode "$mode" --scorers cos1 --final-tta none \
      --jobs "$jobs" --threads 1 --out "$out/validation-warmup$warmup" --quiet
  done
done
