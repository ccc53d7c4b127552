"""``--shifts auto`` (choose_shifts) on synthetic images of known kind."""
import math

import pytest
import torch
import torch.nn.functional as F

from firm.shift_choice import choose_shifts
from firm.shifts import build_shifts


def _uint8(x):
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _coords(size):
    return torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")


def noise_textures(n=200, size=64, seed=0, light=False):
    """Isotropic textures: white noise smoothed by a square box; optionally under a fixed light
    gradient (brighter towards the bottom right), as an inspection rig's lighting."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.rand(n, 1, size + 6, size + 6, generator=g), 7, stride=1)
    x = (x - 0.5) * 3 + 0.5
    if light:
        yy, xx = _coords(size)
        x = x * (0.8 + 0.3 * yy / size + 0.1 * xx / size)
    return _uint8(x)


def blobs(n=200, size=64, seed=0):
    """Random discs at random places."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = _coords(size)
    centre = torch.rand(n, 6, 2, generator=g) * size
    radius = 3 + torch.rand(n, 6, generator=g) * 6
    inside = ((yy - centre[..., 0, None, None]) ** 2 + (xx - centre[..., 1, None, None]) ** 2
              < radius[..., None, None] ** 2).any(1)
    return _uint8(inside.float().unsqueeze(1) * 0.7 + 0.15 + 0.05 * torch.rand(n, 1, size, size, generator=g))


def letters(n=200, size=64, seed=0):
    """A letter F of random size and place, always upright, on a noisy background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = _coords(size)
    scale = (20 + 20 * torch.rand(n, generator=g)).view(n, 1, 1)
    top = torch.rand(n, generator=g).view(n, 1, 1) * (size - scale)
    left = torch.rand(n, generator=g).view(n, 1, 1) * (size - scale)
    u, v = (xx - left) / scale, (yy - top) / scale  # 0..1 inside the letter's box
    box = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    stroke = (u <= 0.25) | (v <= 0.2) | ((v >= 0.4) & (v <= 0.6) & (u <= 0.7))
    ink = (box & stroke).float().unsqueeze(1)
    return _uint8(0.85 - 0.6 * ink + 0.08 * torch.randn(n, 1, size, size, generator=g))


def horizons(n=200, size=64, seed=0):
    """Colour scenes: bright blue sky over dark green ground, a tilted horizon at a random height."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = _coords(size)
    height = (0.35 + 0.3 * torch.rand(n, generator=g)).view(n, 1, 1) * size
    tilt = (torch.rand(n, generator=g).view(n, 1, 1) - 0.5) * 0.4
    sky = (yy < height + tilt * (xx - size / 2)).float().unsqueeze(1)
    colour_sky = torch.tensor([0.55, 0.7, 0.95]).view(1, 3, 1, 1)
    colour_ground = torch.tensor([0.2, 0.45, 0.15]).view(1, 3, 1, 1)
    x = sky * colour_sky + (1 - sky) * colour_ground
    return _uint8(x + 0.06 * torch.randn(n, 3, size, size, generator=g))


# --------------------------------------------------------------------------- --shifts auto
def _accuracy(reason):
    return int(reason.split("% held-out accuracy")[0].rsplit(" ", 1)[1]) / 100


@pytest.mark.parametrize("make", [noise_textures, blobs, lambda: noise_textures(light=True)],
                         ids=["noise textures", "blobs", "textures under a light gradient"])
def test_rotation_invariant_images_get_cut_paste(make):
    shifts, reason = choose_shifts(make())
    assert shifts == ["cutpaste", "cutpaste_scar"]
    assert "rotation-invariant" in reason
    assert _accuracy(reason) < 0.65  # at chance (50%) up to noise: 400 held-out copies, SE 2.5%


@pytest.mark.parametrize("make", [letters, horizons], ids=["upright letters", "horizons"])
def test_oriented_images_get_rotation(make):
    shifts, reason = choose_shifts(make())
    assert shifts == ["rotation"]
    assert "orientation" in reason and _accuracy(reason) >= 0.9


def test_choice_is_deterministic_and_its_names_build():
    images = letters(60, seed=3)
    first = choose_shifts(images, seed=5)
    assert first == choose_shifts(images, seed=5)
    assert build_shifts(first[0]).names == first[0]


def test_large_images_and_float_images():
    big = F.interpolate(letters(200).float(), size=256, mode="bilinear").to(torch.uint8)  # 200 images of 256 px
    assert choose_shifts(big)[0] == ["rotation"]
    assert choose_shifts(noise_textures(100).float() / 255)[0] == ["cutpaste", "cutpaste_scar"]


def test_few_images_need_a_larger_margin_and_tiny_sets_default_to_cut_paste():
    shifts, reason = choose_shifts(letters(3))
    assert shifts == ["cutpaste", "cutpaste_scar"] and "too few" in reason
    _, reason = choose_shifts(letters(10))
    needed = int(reason.split("needed ")[1].split("%")[0]) / 100
    assert needed == pytest.approx(0.5 + 1.5 / math.sqrt(20), abs=0.01)  # three standard errors above chance
    with pytest.raises(ValueError, match="N, C, H, W"):
        choose_shifts(torch.zeros(10, 32, 32, dtype=torch.uint8))


def test_images_that_are_not_square_get_cut_paste():
    """Upright letters stretched to 32 x 48: oriented, but a quarter turn would change their shape."""
    wide = F.interpolate(letters(60).float(), size=(32, 48), mode="bilinear").to(torch.uint8)
    shifts, reason = choose_shifts(wide)
    assert shifts == ["cutpaste", "cutpaste_scar"] and "not square" in reason
    batch = wide[:4].float() / 255
    assert build_shifts(shifts)(batch, torch.tensor([0, 1, 2, 1])).shape == batch.shape
