"""FIRMDetector's score scale (1.0 = the threshold learnt from held-out normal images, in the CSV,
the maps' index and predict alike) and the warning for images resized far from their shape."""
import csv

import numpy as np
import pytest
from PIL import Image

from firm.config import apply_overrides, preset
from firm.detector import FIRMDetector
from firm.inference import score_to_csv

TINY = dict(epochs=1, batch_size=8, width=8, head_layers=1, head_hidden=32, patch_bank=64, holdout=0.25, seed=0)


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
