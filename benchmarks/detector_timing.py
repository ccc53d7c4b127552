"""Fit time, scoring speed and memory of the detector at its defaults, on a folder in the MVTec AD
layout: `FIRMDetector` fitted on train/good with nothing held out (the budget is stated for the
whole fit), then `decision_function` on test/ (images read beforehand, so reading is not timed).
Run it on a quiet machine; it prints one JSON line and writes it to OUT/<set>.json.

    python benchmarks/detector_timing.py DATA/industrial/mvtec_screw --out docs/results/detector-protocol/timing
"""
import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from firm.data import find_images
from firm.detector import FIRMDetector
from firm.evaluation import auroc
from firm.serialization import write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    start = time.perf_counter()
    det = FIRMDetector.from_preset("detector", progress=False, holdout=0.0).fit(args.root / "train" / "good")
    fit = time.perf_counter() - start
    test = find_images(args.root / "test")
    labels = np.array([int(f.parent.name != "good") for f in test])
    images, _ = det.read([str(f) for f in test])
    start = time.perf_counter()
    scores = det.decision_function(images)
    score = time.perf_counter() - start
    grid = det.patches_.grid_
    row = {"set": args.root.name, "method": det.method_, "input_shape": list(det.input_shape),
           "train_images": len(det.train_paths_), "fit_seconds": round(fit, 1), "score_images": len(images),
           "score_seconds": round(score, 1), "images_per_second": round(len(images) / score, 1),
           "image_auroc": auroc(scores, labels), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "bank_bytes": det.patches_.bank_.numel() * 4,
           "fit_feature_bytes_per_normal_image": grid[0] * grid[1] * det.patches_.bank_.shape[1] * 4,
           "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "date": time.strftime("%Y-%m-%d")}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.root.name}.json", row)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
