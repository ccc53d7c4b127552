#!/usr/bin/env bash
# The GPU check of the speed issue, in one run: `firm speed --device cuda` at the paper's width 64
# and head, batch 32 and 512, bf16 autocast off and on; then a short CUDA training on digits with
# autocast and per-epoch evaluation (feature extraction on the GPU). Writes OUT/speed-*.json,
# OUT/train-log.jsonl and OUT/train-results.json.
# Usage: benchmarks/gpu_check.sh OUT_DIR [DEVICE]   (DEVICE=cpu only for a dry run of this script)
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [DEVICE]}
device=${2:-cuda}
width=${WIDTH:-64}      # smaller only for a dry run
batches=${BATCHES:-32 512}
epochs=${EPOCHS:-8}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
for batch in $batches; do
  for amp in off on; do
    echo "== firm speed: width $width, batch $batch, amp $amp"
    timeout 100 python3 -m firm speed --device "$device" --preset paper --width "$width" --batch-size "$batch" --amp "$amp" \
      --out "$out/tmp-speed" && mv "$out/tmp-speed/speed.json" "$out/speed-b$batch-amp$amp.json" \
      || echo "FAILED: speed batch $batch amp $amp"
  done
done
rm -rf "$out/tmp-speed"
run=$(mktemp -d)/digits
echo "== firm train on digits, $device, width $width, batch 512, amp on, eval every epoch"
timeout 90 python3 -m firm train --dataset digits --normal-class 0 --device "$device" --amp on --width "$width" \
  --batch-size 512 --epochs "$epochs" --eval-every 1 --out "$run" --quiet \
  && timeout 60 python3 -m firm evaluate "$run" --scorers cos1,cos5,mahalanobis --final-tta none,angled --quiet \
  && cp "$run/log.jsonl" "$out/train-log.jsonl" && cp "$run/results.json" "$out/train-results.json" \
  || echo "FAILED: train/evaluate"
