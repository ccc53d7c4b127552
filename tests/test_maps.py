"""Anomaly maps (firm.maps): patch bank, coreset, metrics, overlays."""
import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from firm.maps import (
    MAPS_INDEX,
    PatchBank,
    gaussian_blur,
    image_scores,
    greedy_coreset,
    map_metrics,
    nearest_distance,
    patch_features,
    pixel_auroc,
    pro_score,
    read_overlay_index,
    save_overlays,
)
from firm.models import Encoder, ModelConfig

GREY, SIZE = 90, 64
SQUARE = (slice(24, 40), slice(24, 40))  # rows, columns of the pasted square




def make_encoder(seed=0):
    torch.manual_seed(seed)
    return Encoder(ModelConfig(width=16, head_layers=0, image_size=SIZE, stem="cifar"))


@pytest.fixture(scope="module")
def encoder():
    return make_encoder()


def grey(n, h=SIZE, w=SIZE):
    return torch.full((n, 3, h, w), GREY, dtype=torch.uint8)


def with_square(images):
    """A bright square of random texture (160..255) pasted on the images."""
    images = images.clone()
    texture = torch.randint(160, 256, (16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images[:, :, SQUARE[0], SQUARE[1]] = texture
    return images


@pytest.fixture(scope="module")
def fitted(encoder):
    return PatchBank(encoder).fit(grey(3))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_shape_and_alignment(seed):
    bank = PatchBank(make_encoder(seed)).fit(grey(3))
    maps = bank.anomaly_maps(torch.cat([grey(1), with_square(grey(1))]))
    assert maps.shape == (2, SIZE, SIZE) and maps.dtype == torch.float32
    normal, defect = maps
    # With random weights the square lights up as a plateau whose maximum can sit on its rim,
    # so the argmax must fall inside the square give or take the smoothing's sigma (4 px).
    row, col = divmod(int(defect.argmax()), SIZE)
    assert SQUARE[0].start - 4 <= row < SQUARE[0].stop + 4 and SQUARE[1].start - 4 <= col < SQUARE[1].stop + 4
    ys, xs = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    centre = (SQUARE[0].start + SQUARE[0].stop - 1) / 2
    assert abs(float((defect * ys).sum() / defect.sum()) - centre) < 2.5  # no shift: the map's centre of mass
    assert abs(float((defect * xs).sum() / defect.sum()) - centre) < 2.5  # is the square's centre
    inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inside[SQUARE] = True
    assert defect[inside].mean() > 2 * defect[~inside].mean()
    assert image_scores(bank.anomaly_maps(with_square(grey(1))))[0] > 10 * normal.max()  # the normal image matches the bank


def test_patch_features_layout(encoder):
    x = torch.rand(2, 3, SIZE, SIZE)
    feats, layout = patch_features(encoder, x, max_grid=64)
    assert feats.shape == (2, sum(encoder.map_dims((2, 3))), 32, 32) and layout == (0, 2, 0, 2)
    feats, layout = patch_features(encoder, x, max_grid=16)  # stage 2 (32 x 32) pooled by 2
    assert feats.shape[-2:] == (16, 16) and layout == (1, 4, 1, 4)
    with torch.no_grad():  # the first stage, pooled: its 3 x 3 average, then 2 x 2 blocks
        stage2 = torch.nn.functional.avg_pool2d(encoder.feature_maps(x, (2,))[0], 3, 1, 1, count_include_pad=False)
    assert torch.allclose(feats[:, :encoder.map_dims((2,))[0]], torch.nn.functional.avg_pool2d(stage2, 2), atol=1e-5)


def test_maps_of_non_square_images_keep_their_size(encoder):
    bank = PatchBank(encoder, batch_size=2).fit(grey(3, 48, 80))
    maps = bank.anomaly_maps(with_square(grey(3, 48, 80)))
    assert maps.shape == (3, 48, 80)
    # batches give the same maps (up to float32 rounding, which sqrt(2 - 2 cos) magnifies near 0)
    assert torch.allclose(maps[0], maps[2], atol=1e-3)
    assert bank.grid_ == (24, 20)  # CIFAR stem: stage 2 is 24 x 40; 40 > max_grid is pooled by 2


def test_scores_do_not_depend_on_the_batch_or_on_the_maps(encoder):
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (6, 3, SIZE, SIZE), generator=gen, dtype=torch.uint8)
    test = with_square(torch.randint(0, 256, (5, 3, SIZE, SIZE), generator=gen, dtype=torch.uint8))
    maps, scores = PatchBank(encoder, batch_size=32).fit(train).score(test)
    one = PatchBank(encoder, batch_size=1).fit(train)
    no_maps, one_scores = one.score(test, with_maps=False)
    assert no_maps is None
    assert torch.allclose(one_scores, scores, rtol=1e-5)
    assert torch.allclose(one.score(test)[0], maps, rtol=1e-5, atol=1e-6)


def test_bank_size_is_bounded(encoder):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=gen, dtype=torch.uint8)
    bank = PatchBank(encoder, coreset=0.1).fit(images)
    assert bank.n_patches_ == 4 * 16 * 16
    assert len(bank.bank_) == math.ceil(0.1 * bank.n_patches_)
    assert len(PatchBank(encoder, coreset=0.5, max_bank=40).fit(images).bank_) == 40
    assert bank.stage_scales_.shape == (2,) and (bank.stage_scales_ > 0).all()
    with pytest.raises(RuntimeError, match="not fitted"):
        PatchBank(encoder).anomaly_maps(images)
    with pytest.raises(ValueError, match="uint8"):
        bank.anomaly_maps(images.float())


def test_nearest_distance_is_exact():
    gen = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(700, 24, generator=gen), torch.randn(1500, 24, generator=gen)
    expected = torch.cdist(queries.double(), bank.double()).min(1).values.float()
    assert torch.allclose(nearest_distance(bank, queries), expected, atol=1e-4)
    assert (nearest_distance(bank, bank[:5]) == 0).all()  # a bank row is at distance 0
    offset = torch.randn(5, 24, generator=gen)
    near = bank[:5] + 1e-2 * offset / offset.norm(dim=1, keepdim=True)
    # measured directly, not as |q|^2 - (2 q.b - |b|^2), whose rounding would swamp so small a distance
    assert torch.allclose(nearest_distance(bank, near), torch.full((5,), 1e-2), rtol=1e-3)


def test_coreset_is_greedy_k_center_and_keeps_the_farthest_point():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 8, generator=gen)
    x[123] = 50.0  # far from everything
    idx = greedy_coreset(x, 20, projection_dim=None, seed=0)
    assert len(idx) == 20 and len(set(idx.tolist())) == 20
    assert 123 in idx[:2].tolist()
    for k in range(1, len(idx)):  # every pick is the row farthest from the rows picked before it
        d = torch.cdist(x, x[idx[:k]]).min(1).values
        assert d[idx[k]] == pytest.approx(float(d.max()), rel=1e-4)
    assert torch.equal(idx, greedy_coreset(x, 20, projection_dim=None, seed=0))  # deterministic
    projected = greedy_coreset(torch.cat([x, torch.randn(300, 200, generator=gen) * 0.01], 1), 20, projection_dim=16)
    assert len(set(projected.tolist())) == 20 and 123 in projected[:2].tolist()
    assert len(greedy_coreset(torch.ones(50, 4), 10)) == 1  # identical rows: one is enough


def test_gaussian_blur_keeps_mass_and_shape():
    maps = torch.zeros(2, 40, 30)
    maps[0, 20, 15] = 1.0
    out = gaussian_blur(maps, 2.0)
    assert out.shape == maps.shape
    assert float(out[0].sum()) == pytest.approx(1.0, abs=1e-4) and float(out[0].max()) < 0.05
    assert divmod(int(out[0].argmax()), 30) == (20, 15)
    assert gaussian_blur(torch.ones(1, 5, 5), 4.0).allclose(torch.ones(1, 5, 5))  # kernel wider than the map


def test_pixel_auroc_matches_sklearn():
    rng = np.random.default_rng(0)
    maps = np.round(rng.random((3, 10, 12)), 2)  # rounded: ties between pixels too
    masks = (rng.random((3, 10, 12)) > 0.8).astype(np.uint8) * 255
    assert pixel_auroc(torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(
        roc_auc_score(masks.ravel() > 0, maps.ravel()), abs=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        pixel_auroc(maps, masks[:2])


def test_pro_by_hand():
    # one image, one row: regions {0, 1} and {5} (8-connected), defect-free pixels 2, 3, 4
    maps = np.array([[[0.9, 0.2, 0.8, 0.1, 0.05, 0.7]]])
    masks = np.array([[[1, 1, 0, 0, 0, 1]]])
    # thresholds high to low: 0.9 -> PRO 1/4; 0.8 -> FPR 1/3; 0.7 -> PRO 3/4; 0.2 -> PRO 1; 0.1, 0.05 -> FPR 2/3, 1
    assert pro_score(maps, masks, max_fpr=0.3) == pytest.approx(0.25)
    assert pro_score(maps, masks, max_fpr=0.5) == pytest.approx((0.25 / 3 + 1.0 * (0.5 - 1 / 3)) / 0.5)
    assert pro_score(maps, masks, max_fpr=1.0) == pytest.approx(0.25 / 3 + 2 / 3)
    # each region weighs the same whatever its size; a defect-free image adds only false positives
    masks2 = np.zeros((2, 4, 4), dtype=np.uint8)
    masks2[0, :2, :2] = 1  # a 4-pixel region, found
    masks2[0, 3, 3] = 1  # a 1-pixel region, missed below every threshold
    maps2 = np.where(masks2 > 0, 1.0, 0.0)
    maps2[0, 3, 3] = -1.0
    assert pro_score(maps2, masks2) == pytest.approx(0.5)
    assert pro_score(masks2.astype(float), masks2) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="only one kind"):
        pro_score(maps2, np.zeros_like(masks2))


def test_map_metrics(fitted):
    images = torch.cat([grey(2), with_square(grey(2))])
    masks = torch.zeros(4, SIZE, SIZE, dtype=torch.uint8)
    masks[2:, SQUARE[0], SQUARE[1]] = 1
    metrics = map_metrics(fitted.anomaly_maps(images), masks, torch.tensor([0, 0, 1, 1]))
    assert set(metrics) == {"image_auroc", "pixel_auroc", "pro"}
    assert metrics["image_auroc"] == 1.0 and metrics["pixel_auroc"] > 0.9 and metrics["pro"] > 0.5
    assert map_metrics(torch.rand(2, 4, 4), None, [0, 0]) == {}


def test_overlays(fitted, tmp_path):
    images = torch.cat([grey(1), with_square(grey(1)), with_square(grey(1))])
    maps = fitted.anomaly_maps(images)
    masks = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
    masks[1:, SQUARE[0], SQUARE[1]] = 1
    names = ["a/good/000.png", "a/crack/000.png", "a/crack/001.png"]
    out = tmp_path / "run" / "maps"
    written = save_overlays(images, maps, names, out, masks=masks)
    assert [p.name for p in written] == ["good_000.png", "crack_000.png", "001.png"]
    for p in written:
        with Image.open(p) as im:
            assert im.size == (SIZE, SIZE) and im.mode == "RGB"
    with Image.open(written[1]) as im:
        rgb = np.asarray(im).astype(int)
    row, col = divmod(int(maps[1].argmax()), SIZE)
    assert rgb[row, col, 0] > rgb[row, col, 2]  # hottest point is red in jet
    assert tuple(rgb[SQUARE[0].start, SQUARE[1].start + 5]) == (255, 255, 255)  # mask outline
    assert not list(out.glob("*.tmp"))
    with open(out / MAPS_INDEX, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == names
    index = read_overlay_index(out)
    assert index[-1]["file"] == "good_000.png" and index[0]["score"] >= index[1]["score"]


def test_report_shows_anomaly_maps(fitted, tmp_path):
    from firm.report import build_report

    images = torch.cat([grey(1), with_square(grey(1))])
    save_overlays(images, fitted.anomaly_maps(images), ["good.png", "bad.png"], tmp_path / "run" / "maps")
    (tmp_path / "run" / "results.json").write_text("[]")
    page = build_report(tmp_path / "run", progress=False).read_text()
    assert "Anomaly maps" in page and (tmp_path / "run" / "report" / "anomaly_maps.png").is_file()


def test_patch_bank_file_round_trip(fitted, encoder, tmp_path):
    """A fitted PatchBank saved as the detector saves it (patches.safetensors) and read back
    gives the same maps."""
    from firm.serialization import load_tensors, save_tensors

    sha = save_tensors(tmp_path / "patches.safetensors", *fitted.to_tensors())
    tensors, meta = load_tensors(tmp_path / "patches.safetensors", "patch bank", sha)
    back = PatchBank.from_tensors(encoder, tensors, meta, "patches.safetensors")
    assert (back.stages, back.max_bank, back.sigma, back.grid_, back.n_patches_) == \
        (fitted.stages, fitted.max_bank, fitted.sigma, fitted.grid_, fitted.n_patches_)
    images = with_square(grey(2))
    assert torch.equal(back.anomaly_maps(images), fitted.anomaly_maps(images))
