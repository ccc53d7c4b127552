"""The detector on real defect images: development figures on folders in the MVTec AD layout.

For each folder (train/good, test/good, test/<defect>, optional ground_truth/) it measures:

* a raw-pixel kNN baseline (grey 64 x 64 pixels, centred and L2-normalised, cosine to the
  nearest training image);
* the ``detector`` preset as it is (32 px, CIFAR stem, rotation outliers): what ``firm fit``
  gave before images could be larger;
* the detector at 128 px (so the ImageNet stem) with ``--shifts auto``, with its image AUROC from
  the pooled features (cos1) and, from the patch bank's anomaly maps, the image AUROC of the map
  maxima, the pixel AUROC and PRO where masks exist;

and the fit time of each (training, feature bank, and for the maps the patch bank). Writes
OUT/results.json and OUT/README.md. These are development figures: tune on them, do not report
them as held-out results.

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
from firm.training import machine_info

PIXEL_SIZE = 64


def raw_pixel_knn(train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Anomaly scores of the raw-pixel baseline: minus the cosine to the nearest training image."""
    def vectors(images):
        x = resize_images(images, PIXEL_SIZE, 1).float().flatten(1)
        return F.normalize(x - x.mean(1, keepdim=True), dim=1)
    return -knn_similarity(vectors(train), vectors(test), 1)[:, 0]


def detector_figures(name: str, overrides: dict, root: Path) -> dict:
    """Fit the detector (encoder, feature bank and patch bank) and score the test images."""
    settings = apply_overrides(preset("detector"), overrides)
    size = settings.model.image_size
    train, test, is_anomaly, masks = load_defect_dataset(root, size, settings.model.in_channels)
    start = time.perf_counter()
    det = FIRMDetector(settings, progress=False).fit(train.images)
    out = {"detector": name, "image_size": size, "settings": det.settings_.to_dict(), "notes": det.notes_,
           "fit_seconds": time.perf_counter() - start,
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
    ap.add_argument("--out", required=True, help="folder for results.json and README.md")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine_info(), "command": "python benchmarks/industrial_dev.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "root"), "sets": {}}
    large = {"image_size": 128, "shifts": "auto", "seed": args.seed}
    for name in args.sets.split(","):
        root = Path(args.root) / name
        train, test, is_anomaly, _ = load_defect_dataset(root, 256, 3)
        row = {"train_images": len(train), "test_images": len(test), "defects": int(is_anomaly.sum())}
        start = time.perf_counter()
        row["raw_pixel_knn"] = {"image_auroc": auroc(raw_pixel_knn(train.images, test.images), is_anomaly),
                                "fit_seconds": time.perf_counter() - start}
        row["detector_32px"] = detector_figures("detector preset (32 px)", {"seed": args.seed}, root)
        row["detector_128px"] = detector_figures("128 px, shifts auto", large, root)
        results["sets"][name] = row
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(name, json.dumps({k: v for k, v in row["detector_128px"].items() if k != "settings"}), flush=True)
    lines = ["# The detector on the industrial development sets", "",
             f"Command: `{results['command']} --root ../shared/data/industrial`; machine: "
             f"{results['machine']['device_name']}, {results['machine']['torch_threads']} torch threads, torch "
             f"{results['machine']['torch']}. Development figures: the defaults may be tuned on these folders.", "",
             "| set | detector | image AUROC, features (cos1) | image AUROC, map max | pixel AUROC | PRO | fit s | notes |",
             "|---|---|---|---|---|---|---|---|"]
    cell = lambda v: "-" if v is None else f"{v:.3f}"
    for name, row in results["sets"].items():
        lines.append(f"| {name} | raw-pixel kNN ({PIXEL_SIZE} px) | {row['raw_pixel_knn']['image_auroc']:.3f} | - | - | - | "
                     f"{row['raw_pixel_knn']['fit_seconds']:.0f} | |")
        for key in ("detector_32px", "detector_128px"):
            d = row[key]
            lines.append(f"| {name} | {d['detector']} | {d['image_auroc_features']:.3f} | {cell(d.get('image_auroc_maps'))} "
                         f"| {cell(d.get('pixel_auroc'))} | {cell(d.get('pro'))} | {d['fit_seconds']:.0f} "
                         f"| {'; '.join(d['notes'])} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
