"""``firm report`` and ``firm export`` on tiny models trained on scikit-learn's digits (no files needed)."""
import base64
import json
import re
import shutil
import warnings

import numpy as np
import pytest

from firm.cli import main
from firm.config import apply_overrides
from firm.data import load_dataset
from firm.detector import FIRMDetector
from firm.inference import evaluate_model
from firm.export import (
    BANK_NPY,
    DEPLOY_FILE,
    ENCODER_FILE,
    ExportError,
    OnnxDetector,
    export_onnx,
)
from firm.report import build_report



PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = ("roc_histogram", "learning_curve", "extremes", "embedding")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A dataset run (digit 0 normal) as firm train writes it, not yet evaluated."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "--dataset", "digits", "--normal-class", "0", "--train-images", "60", "--width", "8",
                 "--head-hidden", "64", "--head-layers", "1", "--epochs", "2", "--batch-size", "32", "--lr", "0.02",
                 "--checkpoint-every", "0", "--scorer", "cos1", "--tta", "none", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def evaluated(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(run_dir, out)
    evaluate_model(out, scorers=["cos1", "kde"], tta=["none"], progress=False)
    return out


@pytest.fixture(scope="module")
def detector_dir(digits, tmp_path_factory):
    """A detector fitted on digit 3 with cos5 and the angled ensemble."""
    train, _ = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a coarse threshold from 12 held-out images is fine here
        det = FIRMDetector.from_preset("detector", method="firm", epochs=1, batch_size=32, width=8, head_hidden=64,
                                       head_layers=1, scorer="cos5", tta="angled", holdout=0.2, device="cpu",
                                       progress=False).fit(train.images[train.labels == 3][:60])
    return det.save(tmp_path_factory.mktemp("detector") / "model")


def _variant(model_dir, tmp_path, **params):
    """The same encoder and bank saved with other scoring settings."""
    det = FIRMDetector.load(model_dir)
    det.settings_ = apply_overrides(det.settings_, params)
    det._fit_scorers()
    return det.save(tmp_path / "variant")


# ---------------------------------------------------------------------------------------------- report
def test_report_without_scores_says_which_command_adds_them(run_dir, tmp_path):
    page_path = build_report(run_dir, tmp_path / "report", progress=False)
    page = page_path.read_text()
    assert page_path == tmp_path / "report" / "index.html"
    assert f"firm evaluate {run_dir}" in page and "No scores.csv" in page
    assert (tmp_path / "report" / "learning_curve.png").read_bytes().startswith(PNG)
    assert (tmp_path / "report" / "embedding.png").read_bytes().startswith(PNG)
    assert not (tmp_path / "report" / "roc_histogram.png").exists()
    assert "digits, normal class 0" in page


def test_report_embeds_every_figure_and_the_results(evaluated):
    page_path = build_report(evaluated, progress=False)
    assert page_path == evaluated / "report" / "index.html"
    page = page_path.read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == len(FIGURES)
    files = {(evaluated / "report" / f"{name}.png").read_bytes() for name in FIGURES}
    assert {base64.b64decode(e) for e in embedded} == files  # the page and the PNG files show the same figures
    assert not re.search(r'(src|href)="(?!data:)', page)  # self-contained: nothing fetched from elsewhere
    records = json.loads((evaluated / "results.json").read_text())
    for r in records:
        assert f"AUROC {r['scorer']} / {r['tta']}" in page and f"{r['auroc']:.4f}" in page
    assert "AUROC cos1 / none (the detector&#x27;s own score, plotted)" in page and "firm evaluate" not in page


def test_evaluate_records_agree_with_the_per_image_scores(evaluated):
    import csv

    from sklearn.metrics import roc_auc_score
    records = json.loads((evaluated / "results.json").read_text())
    with open(evaluated / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    labels = [int(r["is_anomaly"]) for r in rows]
    assert len(rows) == 602 and sum(labels) == 602 - 60  # the digits test split; digit 0 is normal
    assert all(int(r["is_anomaly"]) == (r["label"] != "0") for r in rows)
    for r in records:
        assert r["auroc"] == pytest.approx(roc_auc_score(labels, [float(x[f"{r['scorer']}:none"]) for x in rows]), abs=1e-4)
    # digit 0 against the other digits is easy, even for two epochs of a width-8 network
    assert min(r["auroc"] for r in records) > 0.8


def test_report_falls_back_to_the_first_score_column(evaluated, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(evaluated, folder)
    config = json.loads((folder / "config.json").read_text())
    config["settings"]["eval"]["scorer"] = "mahalanobis"  # not among the evaluated columns
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "log.jsonl").unlink()
    (folder / "results.json").unlink()
    page = build_report(folder, progress=False).read_text()
    assert "AUROC cos1:none (from scores.csv, plotted)" in page
    assert "<td>threshold</td><td>none</td>" in page  # the threshold belongs to the configured scorer only
    assert "No log.jsonl" in page


def test_report_cli_and_missing_folder(evaluated, tmp_path, capsys):
    assert main(["report", str(evaluated), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert (tmp_path / "r" / "index.html").exists() and "report written to" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nowhere"), "--quiet"]) == 1
    assert "no model, log or scores" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- export
def _unit(det: FIRMDetector) -> float:
    """Raw-score units per unit of the detector's scale: the parity tolerance is on raw scores."""
    return det.score_scale_[1] if det.score_scale_ is not None else 1.0


def test_export_angled_cos5_matches_pytorch(detector_dir, digits):
    summary = export_onnx(detector_dir)
    out = detector_dir / "onnx"
    assert summary["path"] == str(out / ENCODER_FILE) and summary["max_abs_diff"] <= 1e-4
    settings = json.loads((out / DEPLOY_FILE).read_text())
    det = FIRMDetector.load(detector_dir)
    assert settings["image_size"] == 32 and settings["scorer"] == "cos5" and settings["k"] == 5
    assert settings["tta"] == "angled" and settings["threshold"] == det.threshold_
    bank = np.load(out / BANK_NPY, allow_pickle=False)
    assert bank.shape == (4, *det.bank_.features.shape[2:])
    _, test = digits
    images = test.images[:64]
    onnx_det = OnnxDetector(out)
    got, expected = onnx_det.decision_function(images.numpy()), det.decision_function(images)
    unit = _unit(det)
    assert np.max(np.abs(got - expected)) * unit <= 1e-4
    clear = np.abs(expected - det.threshold_) * unit > 1e-4  # images right at the threshold may fall either way
    assert (onnx_det.predict(images.numpy())[clear] == det.predict(images)[clear]).all()
    grey = images[:5, :1].numpy()  # one channel, replicated to RGB as the detector does
    assert np.max(np.abs(onnx_det.decision_function(grey) - det.decision_function(images[:5, :1]))) * unit <= 1e-4


def test_export_cos1_none_and_the_cli(detector_dir, tmp_path, capsys):
    model = _variant(detector_dir, tmp_path, scorer="cos1", tta="none")
    assert main(["export", "--model", str(model), "--out", str(tmp_path / "onnx")]) == 0
    assert "max |score difference| vs PyTorch" in capsys.readouterr().out
    assert np.load(tmp_path / "onnx" / BANK_NPY, allow_pickle=False).shape[0] == 1
    images = np.random.default_rng(1).integers(0, 256, (20, 3, 32, 32), dtype=np.uint8)
    det = FIRMDetector.load(model)
    expected = det.decision_function(images)
    assert np.max(np.abs(OnnxDetector(tmp_path / "onnx").decision_function(images) - expected)) * _unit(det) <= 1e-4


@pytest.mark.parametrize("params, message", [({"scorer": "kde"}, "cos-kNN"), ({"tta": "ensemble"}, "random crops"),
                                             ({"center_crop": 32 / 36}, "center_crop")])
def test_export_refuses_what_onnx_cannot_reproduce(detector_dir, tmp_path, params, message):
    model = _variant(detector_dir, tmp_path, **params)
    with pytest.raises(ValueError, match=message):
        export_onnx(model, tmp_path / "onnx")
    assert not (tmp_path / "onnx" / ENCODER_FILE).exists()


def test_export_raises_when_parity_fails(detector_dir, tmp_path, monkeypatch):
    honest, unit = OnnxDetector.decision_function, _unit(FIRMDetector.load(detector_dir))
    monkeypatch.setattr(OnnxDetector, "decision_function", lambda self, x: honest(self, x) + 1e-3 / unit)
    with pytest.raises(ExportError, match="differ from PyTorch"):
        export_onnx(detector_dir, tmp_path / "onnx")


def test_onnx_detector_checks_its_files_and_inputs(detector_dir, tmp_path):
    out = tmp_path / "onnx"
    shutil.copytree(detector_dir / "onnx", out) if (detector_dir / "onnx").exists() else export_onnx(detector_dir, out)
    det = OnnxDetector(out)
    with pytest.raises(ValueError, match="expected uint8 images"):
        det.decision_function(np.zeros((2, 3, 28, 28), dtype=np.uint8))
    with pytest.raises(ValueError, match="expected uint8 images"):
        det.decision_function(np.zeros((2, 3, 32, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="only patch detectors have anomaly maps"):
        det.anomaly_maps(np.zeros((2, 3, 32, 32), dtype=np.uint8))
    bank = np.load(out / BANK_NPY, allow_pickle=False)
    np.save(out / BANK_NPY, bank + 1, allow_pickle=False)
    with pytest.raises(ValueError, match="corrupted"):
        OnnxDetector(out)
