#!/usr/bin/env bash
# The selection effect (docs/results/cifar10-selection): the budget ladder's classes 0, 2, 6 x FIRM / NT-Xent
# at 100 epochs, seed 0, the cpu preset, with the authors' learning curve: every 10 epochs, their six scorers,
# plain and rotation-averaged. The report sets the last epoch (ours) beside the checkpoint with the best test
# cos5-angled AUROC (theirs; measured, never used). The settings are the ladder's 100-epoch rung but for the
# curve; the digits differ from docs/results/cifar10-ladder's, which trained channels-last. One torch thread,
# lowest priority. Rerun the same command to resume: finished runs are skipped and a stopped run continues from
# its last checkpoint (every 5 epochs). Then, for the report:
#   firm bench --dataset cifar10 --losses firm,ntxent --classes 0,2,6 --seeds 0 --out OUT --report-only
# Usage, from the repository root: benchmarks/cpu_selection.sh DATA_ROOT OUT [extra firm bench flags]
set -euo pipefail
data=${1:?usage: cpu_selection.sh DATA_ROOT OUT}
out=${2:?usage: cpu_selection.sh DATA_ROOT OUT}
shift 2
exec nice -n 19 firm bench --dataset cifar10 --data-root "$data" --classes 0,2,6 --losses firm,ntxent --seeds 0 \
  --preset cpu --epochs 100 --eval-every 10 --curve-scorers cos1,cos5,cos1_norm,cos5_norm,kde,center \
  --curve-tta none,angled --checkpoint-every 5 --jobs 1 --threads 1 --quiet --out "$out" "$@"
