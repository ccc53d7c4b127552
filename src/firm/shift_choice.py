"""``--shifts auto``: whether rotations make outliers of the normal images, or cut-paste defects should.

Rotation outliers help only if a rotated normal image is *not* normal: upright objects,
clothes, digits, aligned parts. For rotation-invariant images (textures, parts photographed in
any orientation) a rotated copy is another normal image. :func:`choose_shifts` measures which
case the normal images are, from the images alone, before training.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .views import grey

__all__ = ["choose_shifts"]

_AUTO_SIDE = 32  # side the images are reduced to before measuring anything
_ORIENTATION_BINS = 12  # gradient-direction bins over the full circle (a quarter turn = 3 bins)
_AUTO_ACCURACY = 0.75  # worst-turn accuracy for "oriented": at least half the turned copies recognisably not normal


def _thumbnails(images: Tensor, side: int, chunk: int = 64) -> Tensor:
    """Float ``(N, C, side, side)`` thumbnails in [0, 1] (antialiased resize), made a chunk at a time."""
    out = []
    for part in images.split(chunk):
        x = part.float()
        if images.dtype == torch.uint8:
            x = x / 255
        out.append(F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False).cpu())
    return torch.cat(out)


def _structure(grey: Tensor, sigma: float = 3.0) -> Tensor:
    """``grey`` without its illumination: the best-fitting plane removed, then a Gaussian blur of it
    (a high-pass). What is left is edges and texture, not the light's direction."""
    n, _, h, w = grey.shape
    ys = torch.linspace(-1, 1, h).view(1, 1, h, 1)
    xs = torch.linspace(-1, 1, w).view(1, 1, 1, w)
    # On a centred grid 1, y and x are orthogonal, so the least-squares plane is three projections.
    plane = (grey.mean((2, 3), keepdim=True) + ys * (grey * ys).sum((2, 3), keepdim=True) / (ys.square().sum() * w)
             + xs * (grey * xs).sum((2, 3), keepdim=True) / (xs.square().sum() * h))
    flat = grey - plane
    radius = int(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=grey.dtype)
    k = torch.exp(-t.square() / (2 * sigma**2))
    k = k / k.sum()
    blurred = F.conv2d(F.pad(flat, (radius,) * 4, mode="reflect"), k.view(1, 1, 1, -1))
    blurred = F.conv2d(blurred, k.view(1, 1, -1, 1))
    return flat - blurred


def _orientation_features(thumbs: Tensor) -> Tensor:
    """Cheap rotation-sensitive descriptors of ``(N, C, S, S)`` thumbnails, ``(N, D)``.

    Magnitude-weighted histograms of the gradient direction over the full circle (signed, so
    that a top edge and a bottom edge differ) of the image's structure (:func:`_structure`), for
    the whole image and each quarter; for colour images also where the colours are (4 x 4
    chromaticity, relative to the image's mean): blue above, green below. Brightness layout is
    left out on purpose: a lighting gradient, constant over an inspection set, would make any
    texture look oriented. Quarter turns permute all of these exactly, so for images without an
    orientation upright and turned copies have the same feature distribution.
    """
    n = thumbs.shape[0]
    g = _structure(grey(thumbs))[:, 0]
    gx = g[:, 1:-1, 2:] - g[:, 1:-1, :-2]
    gy = g[:, 2:, 1:-1] - g[:, :-2, 1:-1]
    magnitude = (gx.square() + gy.square()).sqrt()
    position = (torch.atan2(gy, gx) / (2 * math.pi) * _ORIENTATION_BINS) % _ORIENTATION_BINS
    low = position.floor().long() % _ORIENTATION_BINS
    frac = position - position.floor()
    votes = torch.zeros(*magnitude.shape, _ORIENTATION_BINS)  # each pixel votes for its two nearest bins
    votes.scatter_add_(-1, low.unsqueeze(-1), (magnitude * (1 - frac)).unsqueeze(-1))
    votes.scatter_add_(-1, ((low + 1) % _ORIENTATION_BINS).unsqueeze(-1), (magnitude * frac).unsqueeze(-1))
    side = magnitude.shape[-1]
    half = side // 2
    regions = torch.zeros(5, side, side)
    regions[0] = 1
    for r, (ys, xs) in enumerate([(slice(0, half), slice(0, half)), (slice(0, half), slice(half, side)),
                                  (slice(half, side), slice(0, half)), (slice(half, side), slice(half, side))], start=1):
        regions[r, ys, xs] = 1
    hist = torch.einsum("nhwk,rhw->nrk", votes, regions)
    parts = [(hist / hist.sum(-1, keepdim=True).clamp(min=1e-8)).reshape(n, -1)]
    if thumbs.shape[1] == 3:
        colour = F.adaptive_avg_pool2d(thumbs, 4)
        chroma = (colour[:, :2] / colour.sum(1, keepdim=True).clamp(min=1e-3)).flatten(2)
        parts.append((chroma - chroma.mean(2, keepdim=True)).flatten(1))
    return torch.cat(parts, 1)


def _held_out_accuracy(upright: Tensor, turned: Tensor, folds: Tensor, ridge: float = 1.0) -> float:
    """Cross-validated accuracy of a ridge classifier telling ``upright`` rows from ``turned`` rows;
    row ``i`` of both comes from image ``i`` and both go to fold ``folds[i]``."""
    correct = 0
    for k in folds.unique().tolist():
        test, train = folds == k, folds != k
        x = torch.cat([upright[train], turned[train]]).double()
        y = torch.cat([-torch.ones(int(train.sum())), torch.ones(int(train.sum()))]).double()
        mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
        x = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        penalty = ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
        penalty[-1, -1] = 0  # the intercept is not shrunk
        weights = torch.linalg.solve(x.T @ x + penalty, x.T @ y)
        for rows, sign in ((upright[test], -1), (turned[test], 1)):
            z = torch.cat([(rows.double() - mean) / std, torch.ones(len(rows), 1, dtype=x.dtype)], 1)
            correct += int(((z @ weights) * sign > 0).sum())
    return correct / (2 * len(folds))


def choose_shifts(images: Tensor, seed: int = 0, max_images: int = 1000) -> tuple[list[str], str]:
    """Pick synthetic outliers for ``--shifts auto`` from the normal images alone.

    ``images``: the normal training images, ``(N, C, H, W)``, uint8 (or float in [0, 1]).
    Returns the shift names and a one-line reason with the measured accuracy (the detector
    prints it).

    Rotation outliers help only if a rotated normal image is *not* normal: upright objects,
    clothes, digits, aligned parts. For rotation-invariant images (textures, parts photographed
    in any orientation) a rotated copy is another normal image, and calling it an outlier teaches
    the encoder to push normal images apart. So this measures whether turned copies can be told
    from upright ones. Up to ``max_images`` images (a seeded subset) become 32 x 32 thumbnails;
    for each turn (90, 180, 270 degrees) a ridge classifier on cheap rotation-sensitive
    descriptors that ignore the lighting (:func:`_orientation_features`) learns upright vs turned
    copies, and is scored on held-out images (5 folds, both copies of an image in the same fold).
    If even the worst turn is told apart with at least 75% accuracy (so at least half the turned
    copies are recognisably not normal; and three binomial standard errors above chance, which
    matters below ~40 images), the images have an orientation and the choice is ``["rotation"]``
    (the paper's outliers, all three turns). Otherwise they are taken as rotation-invariant and
    the choice is ``["cutpaste", "cutpaste_scar"]``: local defects, outliers of any image, the
    two kinds the CutPaste paper's best detector used together, and the authors' outliers for
    MVTec AD in some versions of their code. Fewer than 4 images cannot be tested, and images
    that are not square cannot be turned by a quarter without changing their shape: cut-paste.

    A cheap proxy: a CNN sees orientation that these descriptors miss, so natural photos with a
    weak orientation (animals in varied poses) get cut-paste; set the shifts by hand to override.
    It works on 32 x 32 thumbnails of at most ``max_images`` images, so its cost does not grow
    with the image size; deterministic for a given ``seed``.
    """
    if images.ndim != 4:
        raise ValueError(f"choose_shifts needs images (N, C, H, W), got shape {tuple(images.shape)}")
    cut = ["cutpaste", "cutpaste_scar"]
    n = len(images)
    if n < 4:
        return cut, f"only {n} normal image(s): too few to test for an orientation, so cut-paste defects"
    if images.shape[-1] != images.shape[-2]:
        return cut, (f"images of {images.shape[-1]} x {images.shape[-2]} px are not square: a quarter turn would "
                     "change their shape, so cut-paste defects")
    gen = torch.Generator().manual_seed(seed)
    if n > max_images:
        images = images[torch.randperm(n, generator=gen)[:max_images].to(images.device)]
        n = max_images
    thumbs = _thumbnails(images, _AUTO_SIDE)
    upright = _orientation_features(thumbs)
    folds = torch.randperm(n, generator=gen) % min(5, n)
    # 270 degrees is the 90-degree problem mirrored (the descriptors permute exactly under quarter
    # turns, so it is the same problem with the labels swapped): same accuracy, not measured twice.
    quarter, half = (_held_out_accuracy(upright, _orientation_features(torch.rot90(thumbs, k, (-2, -1))), folds)
                     for k in (1, 2))
    worst = min(quarter, half)
    needed = max(_AUTO_ACCURACY, 0.5 + 3 * 0.5 / math.sqrt(2 * n))
    detail = (f"upright and turned copies told apart with {worst:.0%} held-out accuracy at worst "
              f"(90 and 270 degrees {quarter:.0%}, 180 degrees {half:.0%}; chance 50%, needed {needed:.0%})")
    if worst >= needed:
        return ["rotation"], f"{detail}: the images have an orientation, so rotations make outliers"
    return cut, f"{detail}: the images look rotation-invariant, so cut-paste defects make outliers"
