#!/usr/bin/env bash
# The evidence grid at the cpu preset (docs/results/cifar10-seeds, fashionmnist-seeds, cifar10-ladder):
#   1. CIFAR-10, all 10 classes x FIRM / NT-Xent / Rot-SupCon, seeds 0, 1, 2;
#   2. Fashion-MNIST, all 10 classes x FIRM / Rot-SupCon, seeds 0, 1, 2;
#   3. the budget ladder: classes 0, 2, 6 x FIRM / NT-Xent x 10, 30, 100 epochs, seed 0.
# One seed at a time, so that a stopped grid leaves whole seeds behind for the paired statistics,
# and short cells first (the 100-epoch rung last), so that a machine lent for hours at a time
# finishes cells rather than losing long ones half done. Every bench resumes where it stopped:
# the records committed under docs/results/*/runs, finished concat runs of
# benchmarks/cpu_layouts.sh, and the ladder's 10-epoch rung from the seed-0 grid (same settings,
# same run keys) are copied in rather than run again. Measured on the 2-core AMD EPYC VM, one torch
# thread per run, two runs at a time (run time summed over runs, see each folder's README): CIFAR-10
# 40.5 h (27 min per 10-epoch run), Fashion-MNIST 14.05 h (14 min per run), the ladder's 30-epoch
# runs about 40 min each and its 100-epoch runs 2.18-2.27 h each (about 80 s per epoch, evaluation
# included): about 72 h of run time in all, about 36 h of wall time two at a time. The ladder's
# cells checkpoint every 5 epochs and continue from there when the bench is rerun on the same OUT_ROOT.
# Usage, from the repository root: benchmarks/cpu_evidence.sh DATA_ROOT [OUT_ROOT] [JOBS]
set -euo pipefail
data=${1:?usage: cpu_evidence.sh DATA_ROOT [OUT_ROOT] [JOBS]}
out=${2:-runs}
jobs=${3:-2}
committed=$(dirname "$0")/../docs/results
bench() { firm bench --data-root "$data" --preset cpu --jobs "$jobs" --threads 1 --quiet "$@"; }
reuse() {  # reuse DEST FILE...: copy the finished runs that exist into DEST/runs (never over a run there)
  local dest=$1/runs; shift; mkdir -p "$dest"
  for f in "$@"; do if [ -f "$f" ]; then cp -n "$f" "$dest/"; fi; done
}
for grid in cifar10-seeds fashionmnist-seeds cifar10-ladder; do
  reuse "$out/$grid" "$committed/$grid"/runs/*.json
done
reuse "$out/cifar10-seeds" "$out"/cifar10-layouts/runs/cifar10-*-concat-e10-s0.json
for seed in 0 1 2; do
  bench --dataset cifar10 --losses firm,ntxent,rotsupcon --seeds "$seed" --out "$out/cifar10-seeds"
done
for seed in 0 1 2; do
  bench --dataset fashionmnist --losses firm,rotsupcon --seeds "$seed" --out "$out/fashionmnist-seeds"
done
reuse "$out/cifar10-ladder" "$out"/cifar10-seeds/runs/cifar10-c{0,2,6}-{firm,ntxent}-concat-e10-s0.json  # the 10-epoch rung
for ladder in 10,30 10,30,100; do
  bench --dataset cifar10 --classes 0,2,6 --losses firm,ntxent --seeds 0 --epochs-ladder "$ladder" \
    --checkpoint-every 5 --out "$out/cifar10-ladder"
done
