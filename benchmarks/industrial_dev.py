"""The detector on real defect images: development figures on folders in the MVTec AD layout.

For each folder (train/good, test/good, test/<defect>, optional ground_truth/) it measures:

* a raw-pixel kNN baseline (grey 64 x 64 pixels, centred and L2-normalised, cosine to the
  nearest training image);
* the ``detector`` preset at 32 px (``large_image_size 0``: CIFAR stem, rotation outliers), what
  ``firm fit`` did before it chose the size from the images;
* the ``detector`` preset's defaults (images of 128 px and more train at 128 px, ImageNet stem);
* 128 px with ``--shifts auto`` and 10 epochs (a shorter fit with outliers chosen from the data);

each detector with its image AUROC from the pooled features (cos1) and, from the patch bank's
anomaly maps, the image AUROC of the map maxima, the pixel AUROC and PRO where masks exist, and
its fit time (training, feature bank, patch bank). Writes OUT/results.json and OUT/benchmark.md;
a row already in OUT/results.json with the same overrides is kept, so a stopped run resumes.
These are development figures: tune on them, do not report them as held-out results.

    python benchmarks/industrial_dev.py --root ../shared/data/industrial --out docs/results/industrial-dev
"""
import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from firm.config import apply_overrides, preset
from firm.data import load_defect_dataset, resize_images
from firm.detector import FIRMDetector
from firm.evaluation import auroc
from firm.maps import map_metrics
from firm.scoring import knn_similarity
from firm.serialization import atomic_write, write_json
from firm.training import machine_info

PIXEL_SIZE = 64


def raw_pixel_knn(train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Anomaly scores of the raw-pixel baseline: minus the cosine to the nearest training image."""
    def vectors(images):
        x = resize_images(images, PIXEL_SIZE, 1).float().flatten(1)
        return F.normalize(x - x.mean(1, keepdim=True), dim=1)
    return -knn_similarity(vectors(train), vectors(test), 1)[:, 0]


VARIANTS = {  # results.json key: (name, overrides of the detector preset besides the seed)
    "detector_32px": ("detector preset at 32 px", {"large_image_size": 0}),
    "detector_defaults": ("detector preset (defaults)", {}),
    "detector_128px": ("128 px, shifts auto, 10 epochs", {"image_size": 128, "shifts": "auto", "epochs": 10}),
}


def detector_figures(name: str, overrides: dict, root: Path) -> dict:
    """Fit the detector (encoder, feature bank and patch bank) on the training folder and score
    the test images at the size it chose."""
    settings = apply_overrides(preset("detector"), overrides)
    start = time.perf_counter()
    det = FIRMDetector(settings, progress=False).fit(root / "train" / "good")  # as `firm fit` reads a folder
    size = det.image_size
    test = load_defect_dataset(root, size, settings.model.in_channels)[1]
    is_anomaly, masks = test.labels, test.masks
    out = {"detector": name, "overrides": overrides, "image_size": size, "settings": det.settings_.to_dict(),
           "notes": det.notes_, "fit_seconds": time.perf_counter() - start,
           "image_auroc_features": auroc(det.decision_function(test.images), is_anomaly)}
    start = time.perf_counter()
    anomaly_maps = det.anomaly_maps(test.images)
    out["maps_seconds"] = time.perf_counter() - start
    out.update({f"{k}_maps" if k == "image_auroc" else k: v for k, v in map_metrics(anomaly_maps, masks, is_anomaly).items()})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="folder holding the defect folders (e.g. ../shared/data/industrial)")
    ap.add_argument("--sets", default="kolektorsdd,mvtec_screw", help="comma list of folders under --root")
    ap.add_argument("--out", required=True, help="folder for results.json and benchmark.md")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    done = json.loads(path.read_text())["sets"] if path.exists() else {}
    results = {"machine": machine_info(), "command": f"python benchmarks/industrial_dev.py --root ROOT --sets {args.sets} "
               f"--out {args.out} --seed {args.seed}", "sets": {}}
    for name in args.sets.split(","):
        root = Path(args.root) / name
        train, test = load_defect_dataset(root, 256, 3)
        is_anomaly = test.labels
        row = results["sets"][name] = {"train_images": len(train), "test_images": len(test),
                                       "defects": int(is_anomaly.sum())}
        start = time.perf_counter()
        row["raw_pixel_knn"] = {"image_auroc": auroc(raw_pixel_knn(train.images, test.images), is_anomaly),
                                "fit_seconds": time.perf_counter() - start}
        for key, (label, overrides) in VARIANTS.items():
            overrides = {**overrides, "seed": args.seed}
            earlier = done.get(name, {}).get(key)
            row[key] = earlier if earlier and earlier.get("overrides") == overrides else \
                detector_figures(label, overrides, root)
            write_json(path, results)
            print(name, key, json.dumps({k: v for k, v in row[key].items() if k != "settings"}), flush=True)
    lines = ["# The detector on the industrial development sets", "",
             f"Command: `{results['command']}` (ROOT: the folder holding the sets); machine: "
             f"{results['machine']['device_name']}, {results['machine']['torch_threads']} torch threads, torch "
             f"{results['machine']['torch']}. Development figures: the defaults may be tuned on these folders.", "",
             "| set | detector | px | image AUROC, features (cos1) | image AUROC, map max | pixel AUROC | PRO | fit s | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    cell = lambda v: "-" if v is None else f"{v:.3f}"
    for name, row in results["sets"].items():
        lines.append(f"| {name} | raw-pixel kNN | {PIXEL_SIZE} | {row['raw_pixel_knn']['image_auroc']:.3f} | - | - | - | "
                     f"{row['raw_pixel_knn']['fit_seconds']:.0f} | |")
        for key in VARIANTS:
            d = row[key]
            lines.append(f"| {name} | {d['detector']} | {d['image_size']} | {d['image_auroc_features']:.3f} "
                         f"| {cell(d.get('image_auroc_maps'))} | {cell(d.get('pixel_auroc'))} | {cell(d.get('pro'))} "
                         f"| {d['fit_seconds']:.0f} | {'; '.join(d['notes'])} |")
    atomic_write(out / "benchmark.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
