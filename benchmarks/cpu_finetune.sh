#!/usr/bin/env bash
# Fine-tuning ImageNet features on one-class CIFAR-10 (docs/results/cifar10-finetune; issue: FIRM
# where practitioners start): EfficientNet-Lite0 with its packaged ImageNet weights, the
# `finetune` preset (one backbone, one budget for every method), and four methods:
#   frozen  the pretrained features as built, no training (the DN2 baseline),
#   firm    FIRM fine-tuned, rotated copies as the synthetic outliers,
#   msc     mean-shifted contrastive loss with the angular centre term (normal images only),
#   ntxent  NT-Xent fine-tuned on the same batches as FIRM.
# Every run also records, on the normal class's held-out validation share (never trained on),
# the cos1 AUROC of the pretrained and of the fine-tuned features (feature_check in the run file).
# The full grid is 10 classes x seeds 0, 1, 2 x the four methods; one seed at a time, so that a
# stopped grid leaves whole seeds behind for the paired statistics. Every cell is a file under
# OUT/runs, and each fine-tuning cell checkpoints every epoch under OUT/partial: rerunning the
# script on the same OUT continues where it stopped. Keep OUT outside the repository.
#
# Usage, from the repository root:
#   benchmarks/cpu_finetune.sh DATA_ROOT OUT [JOBS]          the full grid
#   SMOKE=1 benchmarks/cpu_finetune.sh DATA_ROOT OUT [JOBS]  the pipeline check: classes 0, 1, seed 0,
#     1 epoch on 256 images at input size 64, scored on the validation split (2,000 images: on a
#     loaded 2-core CPU the test split's 10,000 alone take minutes per run)
# Report (any time, from whatever has finished):
#   firm bench --preset finetune --dataset cifar10 --out OUT --report-only
set -euo pipefail
data=${1:?usage: cpu_finetune.sh DATA_ROOT OUT [JOBS]}
out=${2:?usage: cpu_finetune.sh DATA_ROOT OUT [JOBS]}
jobs=${3:-1}
losses=frozen,firm,msc,ntxent
bench() { firm bench --preset finetune --dataset cifar10 --data-root "$data" --losses "$losses" --jobs "$jobs" --quiet "$@"; }
if [ "${SMOKE:-0}" = 1 ]; then
  bench --classes 0,1 --seeds 0 --epochs 1 --train-images 256 --input-size 64 --split validation \
    --out "$out"
else
  for seed in 0 1 2; do
    bench --seeds "$seed" --out "$out"
  done
fi
firm bench --preset finetune --dataset cifar10 --out "$out" --report-only
