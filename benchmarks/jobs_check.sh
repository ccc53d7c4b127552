#!/usr/bin/env bash
# Does `firm bench --jobs 2 --threads 1` beat `--jobs 1` (two threads) on a 2-core machine?
# The same 8-run digits grid (demo preset, 4 epochs) both ways, timed one after the other.
# Usage: benchmarks/jobs_check.sh OUT_ROOT
set -euo pipefail
out=${1:?usage: jobs_check.sh OUT_ROOT}
grid=(--preset demo --dataset digits --classes 1,2,3,4 --losses firm,ntxent --epochs 4 --quiet)
for jobs in 1 2; do
  rm -rf "$out/jobs$jobs"
  threads=$((2 / jobs))
  start=$(date +%s.%N)
  firm bench "${grid[@]}" --jobs "$jobs" --threads "$threads" --out "$out/jobs$jobs" > /dev/null
  echo "jobs $jobs x $threads threads: $(echo "$(date +%s.%N) - $start" | bc) s"
done
