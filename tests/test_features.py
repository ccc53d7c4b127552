"""firm.features: the test-time zoom and the crop ensembles, under the authors' evaluation settings
(EvalConfig) and the cpu preset's.

The "encoder" here returns its input pixels as the feature, so every test sees exactly the views
the model was given."""
import pytest
import torch
import torch.nn.functional as F

from firm.config import EvalConfig, preset
from firm.features import FeatureSet, center_zoom, extract_features


class PixelEncoder(torch.nn.Module):
    """Features = the flattened image, so a FeatureSet holds the views themselves."""

    def __init__(self, side: int = 32, channels: int = 3):
        super().__init__()
        self.shape = (channels, side, side)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    @property
    def feature_dim(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2]

    def features(self, x):
        return x.flatten(1)


def _views(fs: FeatureSet, shape=(3, 32, 32)) -> torch.Tensor:
    """``(rotations, views, N, C, H, W)`` from pixel features."""
    return fs.features.view(*fs.features.shape[:3], *shape)


def ringed_image(n: int = 2, seed: int = 0) -> torch.Tensor:
    """uint8 32x32 images whose outer 2-pixel ring is white and whose inside is darker, random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 200, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    ring = torch.ones(32, 32, dtype=torch.bool)
    ring[2:-2, 2:-2] = False
    x[:, :, ring] = 255
    return x


def reference_zoom(images_uint8: torch.Tensor) -> torch.Tensor:
    """Resize(36) + CenterCrop(32) done independently: plain bilinear interpolation (an enlargement,
    where antialiasing changes nothing) and a slice."""
    big = F.interpolate(images_uint8.float() / 255, size=(36, 36), mode="bilinear", align_corners=False)
    return big[..., 2:34, 2:34]


def test_test_time_zoom_is_resize_36_then_centre_crop_32():
    images = ringed_image()
    x = images.float() / 255
    zoomed = center_zoom(x, 32 / 36)
    assert zoomed.shape == x.shape
    assert torch.allclose(zoomed, reference_zoom(images), atol=1e-6)
    # The white ring is mostly cut away: the zoomed border is no longer pure white.
    assert (zoomed[..., 0, :] < 0.99).any() and not torch.allclose(zoomed, x)
    assert torch.equal(center_zoom(x, 1.0), x)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="center_crop"):
            center_zoom(x, bad)


@pytest.mark.parametrize("tta", ["none", "angled"])
def test_bank_and_queries_both_get_the_zoom(tta):
    images, model = ringed_image(), PixelEncoder()
    for query in (False, True):
        views = _views(extract_features(model, images, tta, query=query, config=EvalConfig()))
        assert views.shape[1] == 1
        for r in range(views.shape[0]):
            assert torch.allclose(views[r, 0], torch.rot90(reference_zoom(images), r, dims=(-2, -1)), atol=1e-6)
    plain = _views(extract_features(model, images, tta, config=EvalConfig(center_crop=1.0)))
    assert torch.allclose(plain[0, 0], images.float() / 255)


def test_ensemble_first_view_is_the_zoom_and_crops_are_shared_across_rotations():
    images, model = ringed_image(3), PixelEncoder()
    views = _views(extract_features(model, images, "ensemble", query=True, config=EvalConfig()))
    assert views.shape[:3] == (4, 10, 3)
    zoom = reference_zoom(images)
    for r in range(4):
        assert torch.allclose(views[r, 0], torch.rot90(zoom, r, dims=(-2, -1)), atol=1e-6)
        # The authors cut the crops from the upright image and rotate each crop: shared crops.
        assert torch.allclose(views[r], torch.rot90(views[0], r, dims=(-2, -1)), atol=1e-6)
    for v in range(1, 10):
        assert not torch.allclose(views[0, v], views[0, 0], atol=1e-3)
    # The bank never gets crops.
    assert _views(extract_features(model, images, "ensemble", query=False)).shape[:2] == (4, 1)


def test_fresh_crops_per_rotation_when_not_shared():
    images, model = ringed_image(3), PixelEncoder()
    views = _views(extract_features(model, images, "ensemble", config=preset("cpu").eval))
    assert views.shape[:2] == (4, 10)
    assert torch.allclose(views[1, 0], torch.rot90(images.float() / 255, 1, dims=(-2, -1)), atol=1e-6)  # no zoom
    for r in range(1, 4):
        assert torch.allclose(views[r, 0], torch.rot90(views[0, 0], r, dims=(-2, -1)), atol=1e-6)
        assert not torch.allclose(views[r, 1:], torch.rot90(views[0, 1:], r, dims=(-2, -1)), atol=1e-3)


def test_crops_are_cut_from_the_zoomed_image_and_follow_the_seed_and_the_settings():
    images, model = ringed_image(2), PixelEncoder()
    whole = EvalConfig(ensemble_crops=3, ensemble_crop_scale=(1.0, 1.0))
    views = _views(extract_features(model, images, "ensemble", config=whole))
    assert views.shape[:2] == (4, 3)
    assert torch.allclose(views[0, 1:], reference_zoom(images).expand(2, -1, -1, -1, -1), atol=1e-5)
    config = EvalConfig(ensemble_crops=4)
    a = extract_features(model, images, "ensemble", seed=3, config=config).features
    b = extract_features(model, images, "ensemble", seed=3, config=config).features
    c = extract_features(model, images, "ensemble", seed=4, config=config).features
    assert a.shape[1] == 4 and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, 0], c[:, 0])  # the zoomed view does not depend on the seed
