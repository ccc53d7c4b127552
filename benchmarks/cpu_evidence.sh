#!/usr/bin/env bash
# The evidence grid at the cpu preset (docs/results/cifar10-seeds, cifar10-ladder, fashionmnist-seeds):
#   1. CIFAR-10, all 10 classes x FIRM / NT-Xent / Rot-SupCon, seeds 0, 1, 2;
#   2. the budget ladder: classes 0, 2, 6 x FIRM / NT-Xent x 10, 30, 100 epochs, seed 0;
#   3. Fashion-MNIST, all 10 classes x FIRM / Rot-SupCon, seeds 0, 1, 2.
# One seed at a time, so that a stopped grid leaves whole seeds behind for the paired statistics;
# every bench resumes where it stopped. Finished concat runs of benchmarks/cpu_layouts.sh, and
# the ladder's 10-epoch rung from the seed-0 grid (same settings, same run keys), are copied in
# rather than run again. About 220 ten-epoch run-equivalents (84 + 78 for the ladder + 60), at about
# 29 min each with one thread, two at a time: about 2.2 days on a 2-core CPU (measured 2026-11-29).
# Usage: benchmarks/cpu_evidence.sh DATA_ROOT [OUT_ROOT] [JOBS]
set -euo pipefail
data=${1:?usage: cpu_evidence.sh DATA_ROOT [OUT_ROOT] [JOBS]}
out=${2:-runs}
jobs=${3:-2}
bench() { firm bench --data-root "$data" --preset cpu --jobs "$jobs" --threads 1 --quiet "$@"; }
reuse() {  # reuse DEST FILE...: copy the finished runs that exist into DEST/runs (never over a run there)
  local dest=$1/runs; shift; mkdir -p "$dest"
  for f in "$@"; do if [ -f "$f" ]; then cp -n "$f" "$dest/"; fi; done
}
reuse "$out/cifar10-seeds" "$out"/cifar10-layouts/runs/cifar10-*-concat-e10-s0.json
for seed in 0 1 2; do
  bench --dataset cifar10 --losses firm,ntxent,rotsupcon --seeds "$seed" --out "$out/cifar10-seeds"
done
reuse "$out/cifar10-ladder" "$out"/cifar10-seeds/runs/cifar10-c{0,2,6}-{firm,ntxent}-concat-e10-s0.json  # the 10-epoch rung
bench --dataset cifar10 --classes 0,2,6 --losses firm,ntxent --seeds 0 --epochs-ladder 10,30,100 \
  --out "$out/cifar10-ladder"
for seed in 0 1 2; do
  bench --dataset fashionmnist --losses firm,rotsupcon --seeds "$seed" --out "$out/fashionmnist-seeds"
done
