"""The whole user path on folders of real image files, through the ``firm`` CLI in-process:
fit, score, evaluate, report, export; then reload and compare scores across all three paths.

The images are CIFAR-10 pictures written as JPEG and PNG files of mixed sizes (one grey, one
corrupt), so reading, resizing and skipping are exercised as a user's folder would.
"""
import csv
import json
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from firm.cli import main
from firm.data import load_dataset, load_image_folder
from firm.detector import FIRMDetector

pytestmark = pytest.mark.slow  # fits, scores, evaluates and exports on CIFAR-10 images



DATA_ROOT = Path(os.environ.get("FIRM_TEST_DATA_ROOT", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
NORMAL, ANOMALIES = 6, (8, 9)  # frog; ship and truck: far enough apart for a 2-epoch tiny network
TINY = ["--width", "8", "--head-layers", "1", "--head-hidden", "64", "--epochs", "2", "--batch-size", "32",
        "--lr", "0.02", "--quiet", "--method", "firm"]  # the trained path: learning curve, pooled scorers
CHROMIUM = Path("/usr/bin/chromium")


def _save(array: np.ndarray, path: Path, size: tuple[int, int] | None = None, grey: bool = False) -> None:
    from PIL import Image
    im = Image.fromarray(array.transpose(1, 2, 0))
    if size:
        im = im.resize(size, Image.BICUBIC)
    if grey:
        im = im.convert("L")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=95) if path.suffix == ".jpg" else im.save(path)


def write_folders(root: Path, data_root: Path) -> dict[str, Path]:
    """``normal/`` (training), ``test_normal/`` and ``anomalies/`` of CIFAR-10 image files."""
    train, test = load_dataset("cifar10", data_root)
    normal_train = train.images[train.labels == NORMAL][:180].numpy()
    for i, img in enumerate(normal_train):
        if i < 90:
            _save(img, root / "normal" / f"n{i:03d}.png")
        elif i < 160:
            _save(img, root / "normal" / "more" / f"n{i:03d}.jpg")
        else:  # larger, non-square files: the reader must resize them
            _save(img, root / "normal" / "more" / "big" / f"n{i:03d}.png", size=(48, 40))
    _save(train.images[train.labels == NORMAL][180].numpy(), root / "normal" / "grey.jpg", grey=True)
    (root / "normal" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    for i, img in enumerate(test.images[test.labels == NORMAL][:60].numpy()):
        _save(img, root / "test_normal" / f"t{i:03d}.{'jpg' if i % 2 else 'png'}")
    for c in ANOMALIES:
        for i, img in enumerate(test.images[test.labels == c][:30].numpy()):
            _save(img, root / "anomalies" / f"class{c}" / f"a{i:03d}.{'png' if i % 2 else 'jpg'}",
                  size=(40, 48) if i < 3 else None)
    return {k: root / k for k in ("normal", "test_normal", "anomalies")}


@pytest.fixture(scope="module")
def user_path(tmp_path_factory):
    if not (DATA_ROOT / "cifar-10-batches-py").is_dir():
        pytest.skip(f"CIFAR-10 not found under {DATA_ROOT} (set FIRM_TEST_DATA_ROOT)")
    root = tmp_path_factory.mktemp("folders")
    dirs = write_folders(root, DATA_ROOT)
    model, scores_csv = root / "model", root / "scores.csv"
    with warnings.catch_warnings(record=True) as fit_warnings:
        warnings.simplefilter("always")
        assert main(["fit", "--normal-dir", str(dirs["normal"]), "--out", str(model), *TINY]) == 0
    assert main(["score", "--model", str(model), str(dirs["test_normal"]), str(dirs["anomalies"]),
                 "--out", str(scores_csv), "--quiet"]) == 0
    assert main(["evaluate", "--model", str(model), "--normal-dir", str(dirs["test_normal"]), "--anomaly-dir",
                 str(dirs["anomalies"]), "--scorers", "cos1,cos5,kde", "--final-tta", "none", "--quiet"]) == 0
    assert main(["report", str(model), "--quiet"]) == 0
    assert main(["export", "--model", str(model)]) == 0
    return {"root": root, "model": model, "scores_csv": scores_csv, "fit_warnings": fit_warnings, **dirs}


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fit_reads_mixed_files_and_skips_the_corrupt_one(user_path):
    messages = [str(w.message) for w in user_path["fit_warnings"]]
    assert any("corrupt.png" in m and "skipped 1" in m for m in messages), messages
    det = FIRMDetector.load(user_path["model"])
    used = len(det.train_paths_) + len(det.holdout_scores_)
    assert used == 181  # 180 colour files of three kinds and sizes plus the grey one; not the corrupt file
    assert not any("corrupt" in p for p in det.train_paths_)
    assert det.threshold_ is not None and len(det.holdout_scores_) == 18


def test_score_csv_is_ranked_and_flags_above_the_threshold(user_path):
    rows = _read_csv(user_path["scores_csv"])
    assert list(rows[0]) == ["rank", "path", "score", "flagged"]
    assert len(rows) == 60 + 30 * len(ANOMALIES)
    scores = [float(r["score"]) for r in rows]
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    assert scores == sorted(scores, reverse=True)
    threshold = FIRMDetector.load(user_path["model"]).threshold_
    assert all(int(r["flagged"]) == (float(r["score"]) > threshold) for r in rows if abs(float(r["score"]) - threshold) > 1e-5)
    assert all(Path(r["path"]).is_absolute() and Path(r["path"]).is_file() for r in rows)


def test_evaluate_writes_records_that_agree_with_its_per_image_scores(user_path):
    # Detection quality on real data is tested in test_cli_realdata; a 2-epoch width-8 network on
    # 160 images is too small to rank reliably above chance on every CPU, so this checks the plumbing.
    from sklearn.metrics import roc_auc_score
    records = json.loads((user_path["model"] / "results.json").read_text())
    assert [r["scorer"] for r in records] == ["detector", "cos1", "cos5", "kde"]  # its own score first
    assert [r["own"] for r in records] == [True, False, False, False]
    assert all(r["loss"] == "firm" and r["eval_set"] == "folders" for r in records)
    rows = _read_csv(user_path["model"] / "scores.csv")
    assert list(rows[0])[:4] == ["eval_set", "index", "path", "is_anomaly"] and "cos1:none" in rows[0]
    labels = [int(r["is_anomaly"]) for r in rows]
    assert sum(labels) == 30 * len(ANOMALIES)
    assert all(("anomalies" in r["path"]) == bool(int(r["is_anomaly"])) for r in rows)
    for record in records:
        scores = [float(r[f"{record['scorer']}:{record['tta']}"]) for r in rows]
        assert record["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-3)


def test_reloaded_detector_matches_csv_and_onnx_scores(user_path):
    from firm.export import OnnxDetector
    det = FIRMDetector.load(user_path["model"])
    rows = _read_csv(user_path["scores_csv"])
    found = load_image_folder([r["path"] for r in rows], det.image_size)
    assert found.paths == [r["path"] for r in rows]
    torch_scores = det.decision_function(found.images)
    np.testing.assert_allclose(torch_scores, [float(r["score"]) for r in rows], atol=1e-5)
    eval_rows = {r["path"]: float(r["detector:pooled"]) for r in _read_csv(user_path["model"] / "scores.csv")}
    np.testing.assert_allclose(torch_scores, [eval_rows[p] for p in found.paths], atol=1e-5)
    onnx_scores = OnnxDetector(user_path["model"] / "onnx").decision_function(found.images.numpy())
    assert np.max(np.abs(onnx_scores - torch_scores)) * det.score_scale_[1] <= 1e-4  # on the raw score's scale


def test_report_has_every_section(user_path):
    report = user_path["model"] / "report"
    page = (report / "index.html").read_text()
    for name in ("roc_histogram", "learning_curve", "extremes", "embedding"):
        assert (report / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.count("data:image/png;base64,") == 4
    assert "AUROC detector / pooled (the detector&#x27;s own score, plotted)" in page
    assert "firm evaluate" not in page


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium to render the report")
def test_report_renders_in_a_browser(user_path, tmp_path):
    shot = tmp_path / "report.png"
    profile = tempfile.mkdtemp()
    try:
        subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                        f"--screenshot={shot}", "--window-size=1200,3000",
                        (user_path["model"] / "report" / "index.html").resolve().as_uri()],
                       capture_output=True, timeout=120, check=False)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert shot.exists() and shot.stat().st_size > 20_000
    from PIL import Image
    with Image.open(shot) as im:
        assert im.size == (1200, 3000)
        colours = np.asarray(im.convert("RGB").resize((120, 300)))
    assert len(np.unique(colours.reshape(-1, 3), axis=0)) > 50  # figures drew, not a blank or error page
