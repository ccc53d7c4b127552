"""The protocol that chooses the pretrained patch detector's defaults, and its report.

Follows docs/results/detector-protocol/PROTOCOL.md (written before the runs): four development
units (the real KolektorSDD and MVTec screw test splits and a synthetic held-out split of each),
seeds 0, 1, 2, three stages (layers, resolution, coreset size) decided one after the other by the
rule stated there, then the chosen defaults measured through FIRMDetector itself beside the
other methods of --methods: a raw-pixel kNN baseline, the same patch detector on features
fine-tuned with FIRM and the synthetic outliers --shifts auto chooses (method finetune), and FIRM
trained from scratch (method firm).

    python benchmarks/detector_protocol.py --root ../shared/data/industrial --out docs/results/detector-protocol
    python benchmarks/detector_protocol.py --root ../shared/data/industrial --methods finetune,firm --seeds 0

Every finished row is saved in OUT/results.json at once (merged with the rows another process
wrote, so that two invocations with different --methods can run side by side); a rerun skips rows
already there, so a stopped run resumes. OUT/report.md is rebuilt from results.json at the end (--report-only: only that).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from firm.config import apply_overrides, preset
from firm.data import find_images, image_sides, input_shape, load_defect_dataset, resize_images
from firm.detector import FIRMDetector, pretrained_model
from firm.evaluation import auroc
from firm.maps import PatchBank, gaussian_blur, map_metrics
from firm.models import Encoder
from firm.scoring import knn_search
from firm.serialization import atomic_write, read_json, write_json

SEEDS = (0, 1, 2)
UNITS = ("kolektorsdd", "mvtec_screw", "kolektorsdd-synthetic", "mvtec_screw-synthetic")  # every stage is decided over all four
BASE = {"patch_stages": (2, 3), "pretrained_size": 224, "patch_bank": 4096}
STAGES = [("patch_stages", [(2, 3), (2,), (3,)]), ("pretrained_size", [160, 224, 288]),
          ("patch_bank", [1024, 4096, 16384])]
TOLERANCE = 0.005  # a cheaper candidate within this of the best primary figure wins


class FinalMethod(NamedTuple):
    """A method of the final rows: the name its rows carry, the detector settings beside the
    stages' choice (``chosen``: at the chosen layers, size and bank), and whether anything in it
    is random on a real unit (if not, one seed is its row there)."""
    name: str
    overrides: dict
    chosen: bool = False
    random: bool = True


# raw_pixel is the kNN baseline, not a detector
METHODS = {"raw_pixel": FinalMethod("raw_pixel_knn", {}, random=False),
           "patch": FinalMethod("patch_detector", {"method": "patch"}, chosen=True),
           "finetune": FinalMethod("patch_finetuned", {"method": "finetune", "shifts": "auto"}, chosen=True),
           "firm": FinalMethod("firm_from_scratch", {"method": "firm"})}
SYNTHETIC_SHARE = 0.2
PIXEL_SIZE = 64
SMALL_SIZE = 64  # the patch path's side for small images (addendum 2)


# ------------------------------------------------------------------ units
def paste_defects(images: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic defects in uint8 images ``(N, C, H, W)``: in each image either a rectangle cut
    from another image (flipped, brightness shifted by 25-50 %) or a thin straight scratch of
    random intensity, covering 0.5-4 % of the image. Returns the images and 0/1 masks."""
    gen = np.random.default_rng(seed)
    out, masks = images.clone(), torch.zeros(len(images), *images.shape[-2:], dtype=torch.uint8)
    n, _, H, W = images.shape
    for i in range(n):
        area = gen.uniform(0.005, 0.04) * H * W
        if gen.random() < 0.5:
            aspect = gen.uniform(0.5, 2.0)
            h, w = max(2, int(np.sqrt(area / aspect))), max(2, int(np.sqrt(area * aspect)))
            h, w = min(h, H - 1), min(w, W - 1)
            src = images[(i + 1 + gen.integers(n - 1)) % n]
            sy, sx, ty, tx = gen.integers(H - h), gen.integers(W - w), gen.integers(H - h), gen.integers(W - w)
            patch = src[:, sy:sy + h, sx:sx + w].flip(-1).float()
            patch = patch * (1 + gen.choice([-1, 1]) * gen.uniform(0.25, 0.5))
            out[i, :, ty:ty + h, tx:tx + w] = patch.clamp(0, 255).to(torch.uint8)
            masks[i, ty:ty + h, tx:tx + w] = 1
        else:
            width = int(gen.integers(2, 5))
            length = area / width
            angle = gen.uniform(0, np.pi)
            cy, cx = gen.uniform(0.2, 0.8) * H, gen.uniform(0.2, 0.8) * W
            yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                                    indexing="ij")
            along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
            across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
            line = (along.abs() <= length / 2) & (across.abs() <= width / 2)
            out[i][:, line] = int(gen.integers(0, 256))
            masks[i][line] = 1
    return out, masks


def load_unit(root: Path, unit: str, shape: tuple[int, int], seed: int):
    """``(train, test, is_anomaly, masks or None)`` of a unit, images resized to ``shape``."""
    name = unit.removesuffix("-synthetic")
    train, test = load_defect_dataset(root / name, shape, 3)
    if unit == name:
        return train.images, test.images, test.labels, test.masks
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=gen)
    n_test = int(round(SYNTHETIC_SHARE * len(train)))
    held, fit_on = train.images[order[:n_test]], train.images[order[n_test:]]
    n_bad = n_test // 2
    bad, bad_masks = paste_defects(held[:n_bad], seed)
    images = torch.cat([held[n_bad:], bad])
    y = torch.cat([torch.zeros(n_test - n_bad, dtype=torch.long), torch.ones(n_bad, dtype=torch.long)])
    masks = torch.cat([torch.zeros(n_test - n_bad, *shape, dtype=torch.uint8), bad_masks])
    return fit_on, images, y, masks


def unit_shape(root: Path, unit: str, size: int) -> tuple[int, int]:
    """The input shape the detector chooses for a unit's normal images at shorter side ``size``."""
    settings = apply_overrides(preset("detector"), {"pretrained_size": size})
    sides = image_sides(root / unit.removesuffix("-synthetic") / "train" / "good")
    m = pretrained_model(settings, sides)
    return input_shape(m.image_size, m.aspect)


def peak_mb() -> float:
    """This process's peak resident memory in MB. On Linux from /proc (VmHWM starts afresh at exec),
    because ``ru_maxrss`` keeps the parent's peak across fork and exec, so a row measured in a
    subprocess of a large parent would report the parent's memory."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def figures(scores: torch.Tensor, y: torch.Tensor, maps: torch.Tensor | None, masks) -> dict:
    out = {"image_auroc": auroc(np.asarray(scores, dtype=np.float64), y.numpy())}
    if maps is not None and masks is not None:
        metrics = map_metrics(maps, masks, y.numpy())
        out.update(pixel_auroc=metrics.get("pixel_auroc"), pro=metrics.get("pro"))
    return out


# ------------------------------------------------------------------ rows
class Results:
    """Rows of OUT/results.json by key, saved after every new row."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = {r["key"]: r for r in read_json(path, "results")} if path.exists() else {}

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def add(self, row: dict) -> None:
        if self.path.exists():
            self.rows.update({r["key"]: r for r in read_json(self.path, "results")})
        self.rows[row["key"]] = row
        write_json(self.path, sorted(self.rows.values(), key=lambda r: r["key"]))


def config_key(config: dict) -> str:
    return "layers{}-px{}-bank{}".format("".join(map(str, config["patch_stages"])), config["pretrained_size"],
                                         config["patch_bank"])


def selection_rows(results: Results, root: Path, units: list[str], configs: list[dict], seeds) -> None:
    """Rows of the selection stages: features once per (unit, seed split, layers, size), then one
    coreset and scoring per bank size."""
    groups: dict[tuple, list[dict]] = {}
    for c in configs:
        groups.setdefault((tuple(c["patch_stages"]), c["pretrained_size"]), []).append(c)
    for unit in units:
        synthetic = unit.endswith("-synthetic")
        for (stages, size), group in groups.items():
            # a synthetic unit's split depends on the seed; a real unit's features do not
            for split_seed in (seeds if synthetic else seeds[:1]):
                cells = [(c, seed) for c in group for seed in ([split_seed] if synthetic else seeds)
                         if f"select/{config_key(c)}/{unit}/s{seed}" not in results]
                if not cells:
                    continue
                shape = unit_shape(root, unit, size)
                train, test, y, masks = load_unit(root, unit, shape, split_seed)
                settings = apply_overrides(preset("detector"), {"pretrained_size": size})
                encoder = Encoder(pretrained_model(settings, [shape])).eval()
                start = time.perf_counter()
                probe = PatchBank(encoder, stages=stages, max_grid=1000)
                train_grid, test_grid = probe.extract(train), probe.extract(test)
                extract_s = time.perf_counter() - start
                train_share = len(train) / (len(train) + len(test))
                for c, seed in cells:
                    start = time.perf_counter()
                    bank = PatchBank(encoder, stages=stages, coreset=1.0, max_bank=c["patch_bank"], max_grid=1000,
                                     projection_dim=32, seed=seed).fit(train_grid)
                    coreset_s = time.perf_counter() - start
                    start = time.perf_counter()
                    maps, scores = bank.score(test_grid)
                    score_s = time.perf_counter() - start
                    row = {"key": f"select/{config_key(c)}/{unit}/s{seed}", "stage": "select", "config": c,
                           "unit": unit, "seed": seed, "shape": list(shape), "train_images": len(train),
                           "test_images": len(test), "fit_seconds": extract_s * train_share + coreset_s,
                           "score_seconds": score_s + extract_s * (1 - train_share), **figures(scores, y, maps, masks)}
                    results.add(row)
                    print(f"{row['key']}: image AUROC {row['image_auroc']:.4f}"
                          + (f", pixel {row['pixel_auroc']:.4f}" if row.get("pixel_auroc") is not None else "")
                          + f", fit {row['fit_seconds']:.0f} s", flush=True)


def unit_means(results: Results, config: dict, units: list[str], metric: str) -> dict[str, float]:
    """Per unit, the mean of ``metric`` over the seeds run; units without a row are left out."""
    out = {}
    for unit in units:
        values = [r[metric] for r in results.rows.values() if r["stage"] == "select" and r["unit"] == unit
                  and config_key(r["config"]) == config_key(config) and r.get(metric) is not None]
        if values:
            out[unit] = float(np.mean(values))
    return out


def choose(results: Results, units: list[str], candidates: list[dict]) -> tuple[dict | None, list[dict]]:
    """The stage's winner by the protocol's rule (None while a candidate lacks a unit), and a table
    row per candidate."""
    table = []
    for c in candidates:
        image = unit_means(results, c, units, "image_auroc")
        pixel = unit_means(results, c, units, "pixel_auroc")
        fit = unit_means(results, c, units, "fit_seconds")
        table.append({"config": c, "units": len(image), "image_auroc": float(np.mean(list(image.values()))) if image else None,
                      "per_unit": image, "pixel_auroc": float(np.mean(list(pixel.values()))) if pixel else None,
                      "fit_seconds": float(np.mean(list(fit.values()))) if fit else None})
    complete = [t for t in table if t["units"] == len(units)]
    if len(complete) < len(table):
        return None, table  # undecided until every candidate has a row on every unit
    best = max(t["image_auroc"] for t in complete)
    near = [t for t in complete if t["image_auroc"] >= best - TOLERANCE]
    winner = min(near, key=lambda t: (t["fit_seconds"], -t["image_auroc"], -(t["pixel_auroc"] or 0)))
    return winner["config"], table


# ------------------------------------------------------------------ final figures
def raw_pixel_row(root: str, unit: str, seed: int) -> dict:
    """The raw-pixel kNN baseline: grey 64 px, centred and normalised, minus the cosine to the nearest
    normal image; its map is the squared difference from that nearest image, pixel by pixel, resized
    to the masks and smoothed as the detector's maps are (sigma 4 px)."""
    def vectors(images):
        x = resize_images(images, PIXEL_SIZE, 1).float().flatten(1)
        return F.normalize(x - x.mean(1, keepdim=True), dim=1)
    train, test, y, masks = load_unit(Path(root), unit, (PIXEL_SIZE * 2, PIXEL_SIZE * 2), seed)
    start = time.perf_counter()
    bank = vectors(train)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    queries = vectors(test)
    similarity, nearest = knn_search(bank, queries, 1)
    residual = (queries - bank[nearest[:, 0]]).square().view(-1, 1, PIXEL_SIZE, PIXEL_SIZE)
    maps = gaussian_blur(F.interpolate(residual, size=test.shape[-2:], mode="bilinear")[:, 0], 4.0)
    score_s = time.perf_counter() - start
    return {"fit_seconds": fit_s, "score_seconds": score_s, "images_per_second": len(test) / score_s,
            "shape": [PIXEL_SIZE, PIXEL_SIZE], "train_images": len(train), "peak_rss_mb": peak_mb(),
            "threads": torch.get_num_threads(), **figures(-similarity[:, 0], y, maps, masks)}


def detector_row(root: str, unit: str, seed: int, overrides: dict) -> dict:
    """One fit and scoring through FIRMDetector."""
    root = Path(root)
    settings = apply_overrides(preset("detector"), {**overrides, "seed": seed})
    det = FIRMDetector(settings, progress=False)
    if unit.endswith("-synthetic"):  # the split of load_unit: the same seeded order of the sorted files
        paths = find_images(root / unit.removesuffix("-synthetic") / "train" / "good")
        order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))
        fit_paths = [str(paths[i]) for i in order[int(round(SYNTHETIC_SHARE * len(paths))):].tolist()]
    else:
        fit_paths = [str(root / unit / "train" / "good")]
    start = time.perf_counter()
    det.fit(fit_paths)
    fit_s = time.perf_counter() - start
    _, test, y, masks = load_unit(root, unit, det.input_shape, seed)
    start = time.perf_counter()
    if det.patches_ is not None:
        maps, scores = det.maps_and_scores(test)
        maps = torch.from_numpy(maps)
    else:
        maps, scores = None, det.decision_function(test)
    score_s = time.perf_counter() - start
    return {"fit_seconds": fit_s, "score_seconds": score_s, "images_per_second": len(test) / score_s,
            "method_used": det.method_, "score_used": det.score_, "shape": list(det.input_shape),
            "train_images": len(det.train_paths_), "peak_rss_mb": peak_mb(),
            "threads": torch.get_num_threads(), **figures(scores, y, maps, masks)}


def digits_row(digit: int, seed: int) -> dict:
    """The small-image path: the detector at its defaults on scikit-learn's digits, one digit normal
    (its training split), scored on the whole test split by ``decision_function``."""
    from firm.data import load_digits
    train, test = load_digits()
    det = FIRMDetector(apply_overrides(preset("detector"), {"seed": seed}), progress=False)
    start = time.perf_counter()
    det.fit(train.images[train.labels == digit])
    fit_s = time.perf_counter() - start
    scores = det.decision_function(test.images)
    return {"fit_seconds": fit_s, "method_used": det.method_, "score_used": det.score_,
            "shape": list(det.input_shape), "peak_rss_mb": peak_mb(),
            "image_auroc": auroc(scores, (test.labels != digit).long().numpy())}


def small_row(dataset: str, data_root: str | None, normal: int, seed: int, overrides: dict) -> dict:
    """The patch detector on a small-image data set (addendum 2 of the protocol): one class's
    training split normal, the whole test split scored by ``decision_function``."""
    from firm.data import load_dataset
    train, test = load_dataset(dataset, data_root, size=32 if dataset != "digits" else 8)
    det = FIRMDetector(apply_overrides(preset("detector"), {**overrides, "seed": seed}), progress=False)
    start = time.perf_counter()
    det.fit(train.images[train.labels == normal])
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = det.decision_function(test.images)
    score_s = time.perf_counter() - start
    return {"fit_seconds": fit_s, "score_seconds": score_s, "method_used": det.method_, "score_used": det.score_,
            "shape": list(det.input_shape), "train_images": int((train.labels == normal).sum()),
            "test_images": len(test), "peak_rss_mb": peak_mb(),
            "image_auroc": auroc(scores, (test.labels != normal).long().numpy())}


def small_rows(results: Results, data_root: str | None, config: dict, seeds) -> None:
    """Addendum 2: the patch path at SMALL_SIZE px on each digit and each CIFAR-10 class."""
    overrides = {"method": "patch", "pretrained_size": SMALL_SIZE, "patch_stages": list(config["patch_stages"]),
                 "patch_bank": config["patch_bank"]}
    for dataset in ("digits", "cifar10"):
        for normal in range(10):
            for seed in seeds:
                key = f"small/patch{SMALL_SIZE}/{dataset}-c{normal}/s{seed}"
                if key in results:
                    continue
                args = json.dumps([dataset, data_root, normal, seed, overrides])
                out = subprocess.run([sys.executable, __file__, "--one-small", args], capture_output=True, text=True)
                if out.returncode:
                    raise RuntimeError(f"{key} failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                results.add({"key": key, "stage": "small", "method": f"patch{SMALL_SIZE}", "unit": f"{dataset}-c{normal}",
                             "dataset": dataset, "seed": seed, "overrides": overrides, **row})
                print(f"{key}: image AUROC {row['image_auroc']:.4f}, fit {row['fit_seconds']:.0f} s", flush=True)


def digits_rows(results: Results, seeds) -> None:
    for digit in range(10):
        for seed in seeds:
            key = f"digits/detector_defaults/digit{digit}/s{seed}"
            if key in results:
                continue
            out = subprocess.run([sys.executable, __file__, "--one-digit", json.dumps([digit, seed])],
                                 capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{key} failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results.add({"key": key, "stage": "digits", "method": "detector_defaults", "unit": f"digit{digit}",
                         "seed": seed, **row})
            print(f"{key}: image AUROC {row['image_auroc']:.4f} ({row['method_used']}), fit {row['fit_seconds']:.0f} s",
                  flush=True)


def final_rows(results: Results, root: Path, units: list[str], seeds, final: FinalMethod, chosen: dict) -> None:
    """Each (unit, seed) row of ``final`` in its own process, so that its peak memory is its own."""
    method, overrides = final.name, {**chosen, **final.overrides} if final.chosen else final.overrides
    for unit in units:
        for seed in (seeds if final.random or unit.endswith("-synthetic") else seeds[:1]):
            key = f"final/{method}/{unit}/s{seed}"
            if key in results:
                continue
            out = subprocess.run([sys.executable, __file__, "--one", json.dumps([method, str(root), unit, seed, overrides])],
                                 capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{key} failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results.add({"key": key, "stage": "final", "method": method, "unit": unit, "seed": seed,
                         "overrides": overrides, **row})
            print(f"{key}: image AUROC {row['image_auroc']:.4f}, fit {row['fit_seconds']:.0f} s, "
                  f"{row['images_per_second']:.1f} images/s, peak {row['peak_rss_mb']:.0f} MB", flush=True)


# ------------------------------------------------------------------ report
def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def _fmt(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def report(results: Results, units: list[str], stages: list[tuple[str, list[dict], dict, list[dict]]]) -> str:
    lines = ["# Pretrained patch detector: protocol report", "",
             "Built by `python benchmarks/detector_protocol.py` from `results.json` (the protocol: "
             "[PROTOCOL.md](PROTOCOL.md)). Development units: " + ", ".join(units) + ".", ""]
    for name, _, winner, table in stages:
        status = "" if winner is not None else " (in progress: undecided until every candidate has every unit)"
        lines += [f"## Stage: {name}{status}", "", "| candidate | units | mean image AUROC | per unit | mean pixel AUROC | "
                  "mean fit s |", "|---|---|---|---|---|---|"]
        for t in table:
            mark = " **(chosen)**" if winner is not None and config_key(t["config"]) == config_key(winner) else ""
            per = ", ".join(f"{u} {v:.3f}" for u, v in t["per_unit"].items())
            lines.append(f"| {config_key(t['config'])}{mark} | {t['units']} | {_fmt(t['image_auroc'], 4)} | {per} | "
                         f"{_fmt(t['pixel_auroc'], 4)} | {_fmt(t['fit_seconds'], 1)} |")
        lines.append("")
    finals = [r for r in results.rows.values() if r["stage"] == "final"]
    if finals:
        lines += ["## The chosen defaults and the baselines, per unit (mean over seeds, [min, max] over seeds)", "",
                  "| method | unit | seeds | image AUROC | pixel AUROC | PRO | fit s | images/s | peak MB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method in sorted({r["method"] for r in finals}):
            for unit in units:
                rows = [r for r in finals if r["method"] == method and r["unit"] == unit]
                if not rows:
                    continue
                img = [r["image_auroc"] for r in rows]
                lines.append(f"| {method} | {unit} | {len(rows)} | {np.mean(img):.3f} [{min(img):.3f}, {max(img):.3f}] | "
                             f"{_fmt(_mean(rows, 'pixel_auroc'))} | {_fmt(_mean(rows, 'pro'))} | "
                             f"{_fmt(_mean(rows, 'fit_seconds'), 1)} | {_fmt(_mean(rows, 'images_per_second'), 1)} | "
                             f"{_fmt(_mean(rows, 'peak_rss_mb'), 0)} |")
        lines.append("")
    small = sorted((r for r in results.rows.values() if r["stage"] == "small"), key=lambda r: (r["dataset"], r["key"]))
    if small:
        firm_digits = {}
        if (results.path.parent / "digits" / "results.json").exists():
            firm_digits = {r["unit"].removeprefix("digit"): r["image_auroc"]
                           for r in read_json(results.path.parent / "digits" / "results.json", "results") if r["seed"] == 0}
        lines += [f"## Small images: the patch path at {SMALL_SIZE} px (addendum 2)", "",
                  "| data set | normal class | seed | image AUROC, patch | image AUROC, FIRM from scratch (digits/) | fit s |",
                  "|---|---|---|---|---|---|"]
        for r in small:
            c = r["unit"].rsplit("-c", 1)[1]
            firm = firm_digits.get(c) if r["dataset"] == "digits" else None
            lines.append(f"| {r['dataset']} | {c} | {r['seed']} | {r['image_auroc']:.4f} | {_fmt(firm, 4)} | "
                         f"{r['fit_seconds']:.0f} |")
        for dataset in sorted({r["dataset"] for r in small}):
            values = [r["image_auroc"] for r in small if r["dataset"] == dataset]
            lines.append(f"\n{dataset}: mean over {len(values)} classes {np.mean(values):.4f} (min {min(values):.4f}).")
        lines.append("")
    digits = sorted((r for r in results.rows.values() if r["stage"] == "digits"), key=lambda r: r["key"])
    if digits:
        values = [r["image_auroc"] for r in digits]
        lines += ["## Small images: the detector's defaults on scikit-learn's digits (one digit normal)", "",
                  f"Path taken: {', '.join(sorted({r['method_used'] for r in digits}))}; input "
                  f"{digits[0]['shape'][0]} x {digits[0]['shape'][1]} px; score {digits[0]['score_used']}.", "",
                  "| digit | seed | image AUROC | fit s |", "|---|---|---|---|"]
        lines += [f"| {r['unit'].removeprefix('digit')} | {r['seed']} | {r['image_auroc']:.4f} | {r['fit_seconds']:.0f} |"
                  for r in digits]
        lines += ["", f"Mean over {len(values)} digits: {np.mean(values):.4f} (min {min(values):.4f}).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", help="folder holding the development sets (MVTec AD layout)")
    p.add_argument("--out", default="docs/results/detector-protocol")
    p.add_argument("--units", default=",".join(UNITS),
                   help="units whose final rows this run measures (the stages are always decided over all four)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="raw_pixel,patch",
                   help="comma list of what the final rows measure once the stages are decided: " + ", ".join(METHODS))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--digits", action="store_true", help="only the small-image check: the detector on each digit")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--small", action="store_true",
                   help="only addendum 2: the patch path for small images, on the digits and CIFAR-10 (--data-root)")
    p.add_argument("--data-root", help="folder holding cifar-10-batches-py/ (for --small)")
    p.add_argument("--one-digit", help=argparse.SUPPRESS)
    p.add_argument("--one-small", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one_digit:
        print(json.dumps(digits_row(*json.loads(args.one_digit))))
        return 0
    if args.one_small:
        print(json.dumps(small_row(*json.loads(args.one_small))))
        return 0
    if args.one:
        method, root, unit, seed, overrides = json.loads(args.one)
        row = raw_pixel_row(root, unit, seed) if method == "raw_pixel_knn" else detector_row(root, unit, seed, overrides)
        print(json.dumps(row))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = Results(out / "results.json")
    units, seeds = args.units.split(","), [int(s) for s in args.seeds.split(",")]
    if set(units) - set(UNITS):
        p.error(f"unknown units {sorted(set(units) - set(UNITS))}; the protocol's units are {', '.join(UNITS)}")
    if args.digits:  # a folder of its own (--out), so that it can run beside the protocol
        digits_rows(results, seeds[:1])
        atomic_write(out / "report.md", report(results, [], []))
        return 0
    config, stages = dict(BASE), []
    for name, values in STAGES:
        candidates = [{**config, name: v} for v in values]
        if not args.report_only and not args.small:
            selection_rows(results, Path(args.root), list(UNITS), candidates, seeds)
        winner, table = choose(results, list(UNITS), candidates)
        stages.append((name, candidates, winner, table))
        if winner is None:
            break
        config = winner
    decided = [stage for stage in stages if stage[2] is not None]
    if args.small and len(decided) == len(STAGES):
        small_rows(results, args.data_root, config, seeds)
    elif len(decided) == len(STAGES) and not args.report_only:
        root = Path(args.root)
        chosen = {"patch_stages": list(config["patch_stages"]), "pretrained_size": config["pretrained_size"],
                  "patch_bank": config["patch_bank"]}
        for method in args.methods.split(","):
            if method not in METHODS:
                p.error(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
            final_rows(results, root, units, seeds, METHODS[method], chosen)
    atomic_write(out / "report.md", report(results, list(UNITS), stages))
    write_json(out / "chosen.json", {"stages_decided": len(decided), "config": config})
    print(f"report written to {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
