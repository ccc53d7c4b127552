"""Anomaly maps through the detector and the CLI: the patch bank saved and loaded with the model,
``firm score --maps``, ``firm evaluate --mask-dir`` (pixel AUROC, PRO) and the error for a model
without a patch bank. The images are written here: flat grey with noise, defects a bright square."""
import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from firm.cli import main
from firm.detector import FIRMDetector
from firm.maps import MAPS_INDEX
from firm.rundir import CONFIG, PATCHES

SIZE, TRAIN, TEST = 32, 16, 6




def _grey(rng) -> np.ndarray:
    return np.clip(128 + rng.normal(0, 8, (SIZE, SIZE)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """An MVTec-style folder (train/good, test/good, test/defect, ground_truth/defect/<stem>_mask.png)
    and the masks of the test images, normal first, in file-name order."""
    root = tmp_path_factory.mktemp("squares")
    rng = np.random.default_rng(0)
    for sub in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
        (root / sub).mkdir(parents=True)
    for i in range(TRAIN):
        Image.fromarray(_grey(rng)).save(root / "train/good" / f"{i:03d}.png")
    masks = []
    for i in range(TEST):
        Image.fromarray(_grey(rng)).save(root / "test/good" / f"{i:03d}.png")
        masks.append(np.zeros((SIZE, SIZE), dtype=np.uint8))
    for i in range(TEST):
        img, mask = _grey(rng), np.zeros((SIZE, SIZE), dtype=np.uint8)
        r, c = rng.integers(2, SIZE - 10, 2)
        img[r:r + 8, c:c + 8], mask[r:r + 8, c:c + 8] = 250, 1
        Image.fromarray(img).save(root / "test/defect" / f"{i:03d}.png")
        Image.fromarray(mask * 255).save(root / "ground_truth/defect" / f"{i:03d}_mask.png")
        masks.append(mask)
    return {"root": root, "masks": np.stack(masks)}


@pytest.fixture(scope="module")
def model(data, tmp_path_factory) -> tuple[FIRMDetector, Path]:
    det = FIRMDetector.from_preset("detector", progress=False, width=8, head_layers=1, head_hidden=32, image_size=SIZE,
                                   epochs=1, batch_size=8, holdout=0.0, patch_bank=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det.fit(data["root"] / "train/good")
    return det, det.save(tmp_path_factory.mktemp("model"))


def _test_paths(data) -> list[Path]:
    return sorted((data["root"] / "test/good").glob("*.png")) + sorted((data["root"] / "test/defect").glob("*.png"))


def test_patch_bank_round_trip(model, data, tmp_path):
    det, folder = model
    assert det.patches_ is not None and len(det.patches_.bank_) <= 256
    files = json.loads((folder / CONFIG).read_text())["files"]
    assert PATCHES in files and (folder / PATCHES).is_file()
    paths = _test_paths(data)
    before = det.anomaly_maps(paths)
    assert before.shape == (2 * TEST, SIZE, SIZE)
    loaded = FIRMDetector.load(folder)
    assert torch.equal(loaded.patches_.bank_, det.patches_.bank_)
    assert torch.equal(loaded.patches_.stage_scales_, det.patches_.stage_scales_)
    # the trained encoder in memory and its reloaded copy may run different float kernels
    np.testing.assert_allclose(loaded.anomaly_maps(paths), before, rtol=1e-4, atol=1e-6)
    again = FIRMDetector.load(loaded.save(tmp_path / "again"))  # and once more through save: bit for bit
    np.testing.assert_array_equal(again.anomaly_maps(paths), loaded.anomaly_maps(paths))


def test_score_writes_overlays(model, data, tmp_path, capsys):
    _, folder = model
    maps = tmp_path / "maps"
    assert main(["score", "--model", str(folder), str(data["root"] / "test"), "--out", str(tmp_path / "s.csv"),
                 "--maps", str(maps), "--quiet"]) == 0
    assert len(list(maps.glob("*.png"))) == 2 * TEST
    with open(maps / MAPS_INDEX, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * TEST and all((maps / r["file"]).is_file() for r in rows)
    assert len({r["file"] for r in rows}) == 2 * TEST  # good/000.png and defect/000.png kept apart
    # a folder with files in it is refused before anything is scored
    capsys.readouterr()
    assert main(["score", "--model", str(folder), str(data["root"] / "test"), "--out", str(tmp_path / "t.csv"),
                 "--maps", str(maps), "--quiet"]) == 1
    assert "not empty" in capsys.readouterr().err and not (tmp_path / "t.csv").exists()


def test_evaluate_mask_dir_pixel_auroc(model, data, tmp_path, capsys):
    _, folder = model
    root = data["root"]
    assert main(["evaluate", "--model", str(folder), "--normal-dir", str(root / "test/good"), "--anomaly-dir",
                 str(root / "test/defect"), "--mask-dir", str(root / "ground_truth"), "--final-tta", "none",
                 "--out", str(tmp_path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    records = json.loads((tmp_path / "results.json").read_text())
    rec = records[0]  # the detector's own score comes first
    assert rec["scorer"] == "detector" and rec["own"] and {"auroc", "pixel_auroc", "pro"} <= set(rec)
    assert not any(r.get("own") for r in records[1:])
    assert "pixel AUROC" in printed and "PRO" in printed and "own score" in printed
    # the same figures computed here, from the maps and scores of a loaded detector and the masks as drawn
    det = FIRMDetector.load(folder)
    maps = det.anomaly_maps(_test_paths(data))
    expected = roc_auc_score(data["masks"].ravel(), maps.ravel())
    assert rec["pixel_auroc"] == pytest.approx(expected, abs=1e-9)
    assert rec["pixel_auroc"] > 0.8
    labels = np.r_[np.zeros(TEST), np.ones(TEST)]
    assert rec["auroc"] == pytest.approx(roc_auc_score(labels, det.decision_function(_test_paths(data))), abs=1e-9)
    assert 0 <= rec["pro"] <= 1
    with open(tmp_path / "scores.csv", newline="") as f:
        assert f"detector:{det.score_}" in next(csv.reader(f))


def test_model_without_patch_bank(model, data, tmp_path, capsys):
    """A model folder without patches.safetensors (patch_bank 0, firm train, an older firm):
    --maps and --mask-dir say how to get maps, and nothing is written."""
    _, folder = model
    old = tmp_path / "old"
    old.mkdir()
    for p in folder.iterdir():
        if p.name != PATCHES:
            (old / p.name).write_bytes(p.read_bytes())
    config = json.loads((old / CONFIG).read_text())
    del config["files"][PATCHES]
    (old / CONFIG).write_text(json.dumps(config))
    det = FIRMDetector.load(old)
    assert det.patches_ is None
    with pytest.raises(ValueError, match="patch_bank > 0"):
        det.anomaly_maps(_test_paths(data))
    capsys.readouterr()
    assert main(["score", "--model", str(old), str(data["root"] / "test"), "--out", str(tmp_path / "s.csv"),
                 "--maps", str(tmp_path / "maps"), "--quiet"]) == 1
    assert "refit it with patch_bank > 0" in capsys.readouterr().err
    assert not (tmp_path / "maps").exists() and not (tmp_path / "s.csv").exists()
    assert main(["evaluate", "--model", str(old), "--normal-dir", str(data["root"] / "test/good"), "--anomaly-dir",
                 str(data["root"] / "test/defect"), "--mask-dir", str(data["root"] / "ground_truth"),
                 "--out", str(tmp_path / "ev"), "--quiet"]) == 1
    assert "patch_bank > 0" in capsys.readouterr().err


def test_fit_without_patch_bank(data, tmp_path):
    det = FIRMDetector.from_preset("detector", progress=False, width=8, head_layers=1, head_hidden=32, image_size=SIZE,
                                   epochs=1, batch_size=8, holdout=0.0, patch_bank=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det.fit(data["root"] / "train/good")
    assert det.patches_ is None
    folder = det.save(tmp_path / "m")
    assert not (folder / PATCHES).exists() and FIRMDetector.load(folder).patches_ is None
