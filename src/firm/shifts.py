"""Synthetic outliers: distribution-shifting transforms.

A :class:`Shift` turns a batch of ID images into outliers. It may have several *variants*
(rotation has three: 90, 180 and 270 degrees); every variant is one synthetic outlier kind and,
for Rot-SupCon, one label. Shifts work on whole batches of float images ``(B, C, H, W)`` in
[0, 1] on any device, draw their randomness from the ``torch.Generator`` they are given, and
never loop over images in Python. :data:`SHIFTS` is the registry (name -> factory and a one-line
description); :func:`build_shifts` reads it, the command line takes its keys as choices.

The shifts follow the authors' code (github.com/Willtl/firm: ``data.py``
``SyntheticOutlierDataset._expose_samples_with_labels``, ``util.py`` ``CutPaste`` and
``CutPasteScar``, ``transforms.py`` ``segmentScramble`` and ``mixup``), with one difference in
kind for all random shifts: the authors draw each image's outlier once, when the dataset is
built, and reuse it in every epoch; here an outlier is drawn afresh each time a batch needs one.
Smaller differences are named in each class.

The name :data:`AUTO` (``--shifts auto``) is no shift: :func:`firm.shift_choice.choose_shifts`
resolves it from the normal images.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Registry
from .views import grey

__all__ = [
    "Shift", "Rotation", "HorizontalFlip", "CutPaste", "CutPasteScar", "Scramble", "Mixup", "PatchPermutation",
    "ShiftSet", "ShiftEntry", "SHIFTS", "AUTO", "build_shifts",
]


class Shift:
    """A distribution-shifting transform with ``num_variants`` outlier kinds."""

    name: str = "shift"
    num_variants: int = 1

    def __call__(self, images: Tensor, variant: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Shift each image by its variant (``0 <= variant < num_variants``); returns a new batch."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- random helpers
def _rand(shape, images: Tensor, generator) -> Tensor:
    return torch.rand(shape, generator=generator, device=images.device)


def _uniform(shape, low: float, high: float, images: Tensor, generator) -> Tensor:
    return low + (high - low) * _rand(shape, images, generator)


def _randint(low: Tensor | int, high: Tensor | int, shape, images: Tensor, generator) -> Tensor:
    """Integers uniform in ``[low, high]`` (both included; tensor bounds are per element)."""
    low = torch.as_tensor(low, device=images.device)
    high = torch.as_tensor(high, device=images.device)
    n = (high - low + 1).clamp(min=1)
    return (low + (_rand(shape, images, generator) * n).floor().long()).minimum(high.maximum(low))


def _gather_pixels(images: Tensor, sy: Tensor, sx: Tensor) -> Tensor:
    """``out[b, :, y, x] = images[b, :, sy[b, y, x], sx[b, y, x]]`` (indices already in range)."""
    b, c, h, w = images.shape
    index = (sy * w + sx).view(b, 1, h * w).expand(b, c, h * w)
    return images.flatten(2).gather(2, index).view(b, c, h, w)


# ----------------------------------------------------------------------------- the shifts
class Rotation(Shift):
    """Rotation by multiples of 90 degrees (the paper's default: 90, 180, 270)."""

    name = "rotation"

    def __init__(self, angles: tuple[int, ...] = (90, 180, 270)):
        if not angles or any(a % 90 or a % 360 == 0 for a in angles):
            raise ValueError(f"rotation angles must be non-zero multiples of 90 degrees, got {angles}")
        self.quarter_turns = [(a // 90) % 4 for a in angles]
        self.num_variants = len(angles)

    def __call__(self, images: Tensor, variant: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"rotation shifts need square images, got {tuple(images.shape[-2:])}")
        out = images
        for v, k in enumerate(self.quarter_turns):
            out = torch.where((variant == v).view(-1, 1, 1, 1), torch.rot90(images, k, dims=(-2, -1)), out)
        return out


class HorizontalFlip(Shift):
    """Mirror image (a shift only for data that has a handedness; off by default)."""

    name = "hflip"

    def __call__(self, images: Tensor, variant: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return images.flip(-1)


class CutPaste(Shift):
    """CutPaste (Li et al., 2021) as the authors make outliers with it: a rectangle copied elsewhere.

    Area in ``area`` (a fraction of the image), aspect ratio log-uniform in ``aspect`` (height =
    sqrt(area * ratio), up to 10 draws until it fits, as theirs), source anywhere in the image,
    destination anywhere else (never the source position). No colour jitter on the patch (theirs
    has none; the CutPaste paper's has).

    ``p`` is the probability that an image is pasted at all; an image that is not comes back
    unchanged and is still an outlier (the authors append every shifted copy with label -1
    whether or not it was changed). Their ``CutPaste`` class defaults to ``p=0.5``, but the code
    that makes their outliers passes ``p=1.0`` or uses a version of the class that always pastes;
    so the default here is 1.
    """

    name = "cutpaste"

    def __init__(self, p: float = 1.0, area: tuple[float, float] = (0.02, 0.15), aspect: tuple[float, float] = (0.3, 3.3),
                 tries: int = 10):
        if not 0 <= p <= 1:
            raise ValueError(f"cut-paste probability must be in [0, 1], got {p}")
        self.p, self.area, self.aspect, self.tries = p, area, aspect, tries

    def __call__(self, images: Tensor, variant: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b, _, h, w = images.shape
        area = _uniform((b, self.tries), *self.area, images, generator) * (h * w)
        ratio = _uniform((b, self.tries), math.log(self.aspect[0]), math.log(self.aspect[1]), images, generator).exp()
        ph, pw = (area * ratio).sqrt().round().long(), (area / ratio).sqrt().round().long()
        fits = (ph >= 1) & (pw >= 1) & (ph <= h) & (pw <= w)
        first = fits.long().argmax(1, keepdim=True)  # the first draw that fits (the authors' retry loop)
        ph = ph.gather(1, first).squeeze(1).clamp(1, h)  # no draw fits: clipped (never with the defaults)
        pw = pw.gather(1, first).squeeze(1).clamp(1, w)
        cols = w - pw + 1
        positions = (h - ph + 1) * cols
        src = _randint(0, positions - 1, b, images, generator)
        # Destination uniform over the other positions; a patch as large as the image cannot move.
        dst = _randint(0, positions - 2, b, images, generator)
        dst = torch.where(positions > 1, dst + (dst >= src).long(), src)
        si, sj, di, dj = src // cols, src % cols, dst // cols, dst % cols
        pasted = _rand(b, images, generator) < self.p

        ys = torch.arange(h, device=images.device).view(1, h, 1)
        xs = torch.arange(w, device=images.device).view(1, 1, w)
        di, dj, si, sj, ph, pw = (t.view(b, 1, 1) for t in (di, dj, si, sj, ph, pw))
        inside = (ys >= di) & (ys < di + ph) & (xs >= dj) & (xs < dj + pw) & pasted.view(b, 1, 1)
        moved = _gather_pixels(images, (ys - di + si).clamp(0, h - 1), (xs - dj + sj).clamp(0, w - 1))
        return torch.where(inside.unsqueeze(1), moved, images)


def _patch_jitter(images: Tensor, region: Tensor, strength: tuple[float, float, float, float], generator) -> Tensor:
    """Colour jitter of the patch ``region`` (B, 1, H, W): brightness, contrast (about the patch's
    mean grey, as torchvision's jitter of a cropped patch), saturation and hue, in that order.

    Hue turns colours about the grey axis of RGB, a linear stand-in for torchvision's HSV hue
    shift (this module sits below ``views`` and does not import it); grey images get brightness
    and contrast only, as in torchvision.
    """
    b = images.shape[0]
    bright, contrast, sat, hue = strength

    def factor(x: float) -> Tensor:
        return _uniform(b, max(0.0, 1 - x), 1 + x, images, generator).view(b, 1, 1, 1)

    x = (images * factor(bright)).clamp(0, 1)
    mean = (grey(x) * region).sum((1, 2, 3), keepdim=True) / region.sum((1, 2, 3), keepdim=True).clamp(min=1)
    f = factor(contrast)
    x = (f * x + (1 - f) * mean).clamp(0, 1)
    if images.shape[1] == 3:
        f = factor(sat)
        x = (f * x + (1 - f) * grey(x)).clamp(0, 1)
        theta = _uniform(b, -hue, hue, images, generator) * 2 * math.pi
        cos, sin = theta.cos().view(b, 1, 1), theta.sin().view(b, 1, 1)
        eye = torch.eye(3, device=images.device)
        cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], device=images.device)
        turn = cos * eye + (1 - cos) / 3 + sin / math.sqrt(3) * cross  # Rodrigues' rotation about (1, 1, 1)
        x = torch.einsum("bij,bjhw->bihw", turn.to(x.dtype), x).clamp(0, 1)
    return x


class CutPasteScar(Shift):
    """CutPaste-scar as the authors make outliers with it: a thin patch, jittered, rotated, pasted.

    As theirs: width ``width`` and length ``length`` in pixels (integers, both ends included;
    clipped to the image), cut anywhere in the image, colour jitter ``jitter`` (brightness,
    contrast, saturation, hue) on the patch, rotated by an angle uniform in ``angle`` degrees
    about its centre with bilinear resampling and soft (anti-aliased) edges, pasted where the
    rotated patch's bounding box lies inside the image. ``p`` as in :class:`CutPaste` (the
    authors: always).

    Sizes stay in pixels whatever the image size: 2-16 x 10-25 px are the CutPaste paper's scars
    on 256 px images, and the authors kept the same pixels on 32 px images, so no scaling matches
    both at their sizes. Differences: the hue jitter (see :func:`_patch_jitter`) and the jitter
    order, fixed here, random in torchvision.
    """

    name = "cutpaste_scar"

    def __init__(self, p: float = 1.0, width: tuple[int, int] = (2, 16), length: tuple[int, int] = (10, 25),
                 angle: tuple[float, float] = (-45.0, 45.0), jitter: tuple[float, float, float, float] = (0.1, 0.1, 0.1, 0.1)):
        if not 0 <= p <= 1:
            raise ValueError(f"cut-paste probability must be in [0, 1], got {p}")
        if not 1 <= width[0] <= width[1] or not 1 <= length[0] <= length[1]:
            raise ValueError(f"scar width and length must be pixel ranges (low <= high, >= 1), got {width}, {length}")
        self.p, self.width, self.length, self.angle, self.jitter = p, width, length, angle, jitter

    def __call__(self, images: Tensor, variant: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b, _, h, w = images.shape
        dev = images.device
        pw = _randint(*self.width, b, images, generator).clamp(max=w).float()
        ph = _randint(*self.length, b, images, generator).clamp(max=h).float()
        sj = _randint(0, (w - pw).long(), b, images, generator).float()
        si = _randint(0, (h - ph).long(), b, images, generator).float()
        theta = _uniform(b, *self.angle, images, generator) * (math.pi / 180)
        cos, sin = theta.cos(), theta.sin()
        # The rotated patch's bounding box (PIL's expand=True) must lie inside the image.
        box_w = (pw * cos.abs() + ph * sin.abs()).sub(1e-4).ceil()
        box_h = (pw * sin.abs() + ph * cos.abs()).sub(1e-4).ceil()
        tj = _randint(0, (w - box_w).long().clamp(min=0), b, images, generator).float()
        ti = _randint(0, (h - box_h).long().clamp(min=0), b, images, generator).float()
        pasted = _rand(b, images, generator) < self.p

        ys = torch.arange(h, device=dev, dtype=torch.float32).view(1, h, 1) + 0.5  # pixel centres
        xs = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, w) + 0.5
        col = lambda t: t.view(b, 1, 1)
        dx, dy = xs - col(tj + box_w / 2), ys - col(ti + box_h / 2)
        u = col(cos) * dx + col(sin) * dy  # the pixel in the patch's own frame
        v = -col(sin) * dx + col(cos) * dy
        half_w, half_h = col(pw) / 2, col(ph) / 2
        alpha = (half_w + 0.5 - u.abs()).clamp(0, 1) * (half_h + 0.5 - v.abs()).clamp(0, 1)
        alpha = alpha * col(pasted.float())
        # Source point: clamped to the patch's outermost pixel centres, so edge pixels are the patch's own.
        src_x = col(sj) + half_w + torch.maximum(torch.minimum(u, half_w - 0.5), 0.5 - half_w)
        src_y = col(si) + half_h + torch.maximum(torch.minimum(v, half_h - 0.5), 0.5 - half_h)

        region = ((ys >= col(si)) & (ys < col(si + ph)) & (xs >= col(sj)) & (xs < col(sj + pw))).unsqueeze(1)
        source = _patch_jitter(images, region.to(images.dtype), self.jitter, generator) if any(self.jitter) else images
        grid = torch.stack([src_x * (2 / w) - 1, src_y * (2 / h) - 1], -1).to(images.dtype)
        patch = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
        alpha = alpha.unsqueeze(1).to(images.dtype)
        return alpha * patch + (1 - alpha) * images


class Scramble(Shift):
    """The authors' patch scramble (``segmentScramble``): cells turned, then part of them shuffled.

    The image is cut into cells of ``coefficient`` x its side (4 x 4 cells by default). Each cell
    is turned by one of rot90, rot180, rot270, horizontal flip or left as it is, uniformly; then
    with probability ``shuffle_p`` a run of consecutive cells (row-major order, random length 1..n,
    random start) is shuffled. As theirs, a scrambled image can rarely equal the original (every
    cell left as it is and no effective shuffle). Sides not divisible into whole cells: the left-
    over border keeps its pixels (theirs turns black). Needs square cells (square images).
    """

    name = "scramble"

    def __init__(self, coefficient: float = 0.25, shuffle_p: float = 0.5):
        if not 0 < coefficient <= 0.5:
            raise ValueError(f"scramble coefficient must be in (0, 0.5], got {coefficient}")
        self.coefficient, self.shuffle_p = coefficient, shuffle_p

    def _grid(self, side: int) -> tuple[int, int]:
        cell = max(1, int(side * self.coefficient))
        count = side // cell
        return count, side // count  # cells per side, cell side (their rounding)

    def __call__(self, images: Tensor, variant: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b, c, h, w = images.shape
        (rows, ch), (cols, cw) = self._grid(h), self._grid(w)
        if ch != cw:
            raise ValueError(f"scramble turns cells by 90 degrees and needs square cells; image {h}x{w} gives {ch}x{cw}")
        n, s = rows * cols, ch
        core = images[..., : rows * s, : cols * s]
        cells = core.reshape(b, c, rows, s, cols, s).permute(0, 2, 4, 1, 3, 5).reshape(b, n, c, s, s)
        choices = torch.stack([torch.rot90(cells, 1, (-2, -1)), torch.rot90(cells, 2, (-2, -1)),
                               torch.rot90(cells, 3, (-2, -1)), cells.flip(-1), cells])
        turn = _randint(0, 4, (b, n), images, generator)
        bi = torch.arange(b, device=images.device).view(b, 1)
        cells = choices[turn, bi, torch.arange(n, device=images.device).view(1, n)]

        shuffle = _rand(b, images, generator) < self.shuffle_p
        length = _randint(1, n, b, images, generator)
        start = _randint(0, n - length, b, images, generator)
        pos = torch.arange(n, device=images.device).view(1, n)
        window = (pos >= start.view(b, 1)) & (pos < (start + length).view(b, 1)) & shuffle.view(b, 1)
        # Sort keys: cells outside the window keep their index; those inside get random keys
        # within [start - 0.5, start + length - 0.5), so they trade places only among themselves.
        key = torch.where(window, start.view(b, 1) - 0.5 + _rand((b, n), images, generator) * length.view(b, 1), pos.float())
        cells = cells[bi, key.argsort(1)]

        out = images.clone()
        out[..., : rows * s, : cols * s] = cells.reshape(b, rows, cols, c, s, s).permute(0, 3, 1, 4, 2, 5).reshape(
            b, c, rows * s, cols * s)
        return out


def _beta(a: float, b: float, n: int, images: Tensor, generator, tries: int = 16) -> Tensor:
    """``n`` draws from Beta(a, b) with the given generator (torch's Beta takes none).

    Johnk's rejection method with ``tries`` proposals at once: x = u^(1/a), y = v^(1/b), accepted
    if x + y <= 1 (probability G(a+1)G(b+1)/G(a+b+1), 0.85 for a = b = 0.4), giving x / (x + y).
    If all proposals are rejected (about once in 1e13 draws) the draw is 0.5.
    """
    lx = _rand((n, tries), images, generator).clamp(min=1e-12).log() / a
    ly = _rand((n, tries), images, generator).clamp(min=1e-12).log() / b
    accept = torch.logaddexp(lx, ly) <= 0  # x + y <= 1, in logs
    value = torch.sigmoid(lx - ly)  # x / (x + y)
    first = accept.long().argmax(1, keepdim=True)
    return torch.where(accept.any(1), value.gather(1, first).squeeze(1), torch.full_like(value[:, 0], 0.5))


class Mixup(Shift):
    """The authors' mixup shift: ``lam * image + (1 - lam) * other``, ``lam ~ Beta(alpha, alpha)``.

    ``other`` is another image of the same batch (batches are drawn at random from the normal
    images, so it is a random normal image; theirs is drawn from the whole training set and may
    be the image itself). Theirs casts the mix to uint8, flooring it (at most 1/255 darker);
    here it stays float. With ``alpha=0.4`` the weight is often near 0 or 1, so some outliers are
    close to a normal image: that is the authors' recipe.
    """

    name = "mixup"

    def __init__(self, alpha: float = 0.4):
        if alpha <= 0:
            raise ValueError(f"mixup alpha must be positive, got {alpha}")
        self.alpha = alpha

    def __call__(self, images: Tensor, variant: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b = images.shape[0]
        lam = _beta(self.alpha, self.alpha, b, images, generator).to(images.dtype).view(b, 1, 1, 1)
        other = (torch.arange(b, device=images.device) + _randint(1, max(b - 1, 1), b, images, generator)) % b
        return lam * images + (1 - lam) * images[other]


class PatchPermutation(Shift):
    """Split the image into a ``grid x grid`` array of patches and shuffle them (never the identity)."""

    name = "permutation"

    def __init__(self, grid: int = 2):
        if grid < 2:
            raise ValueError(f"patch permutation needs grid >= 2, got {grid}")
        self.grid = grid

    def __call__(self, images: Tensor, variant: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b, c, h, w = images.shape
        g = self.grid
        if h % g or w % g:
            raise ValueError(f"image size {h}x{w} is not divisible by the permutation grid {g}")
        n = g * g
        perm = torch.rand(b, n, generator=generator, device=images.device).argsort(1)
        identity = (perm == torch.arange(n, device=images.device)).all(1, keepdim=True)
        perm = torch.where(identity, perm.roll(1, dims=1), perm)
        patches = images.reshape(b, c, g, h // g, g, w // g).permute(0, 2, 4, 1, 3, 5).reshape(b, n, c, h // g, w // g)
        patches = patches[torch.arange(b, device=images.device).unsqueeze(1), perm]
        return patches.reshape(b, g, g, c, h // g, w // g).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class ShiftSet:
    """Several shifts behind one variant numbering: variants 1..V, 0 meaning "not shifted"."""

    def __init__(self, shifts: list[Shift]):
        if not shifts:
            raise ValueError("at least one shift is needed to make synthetic outliers")
        self.shifts = shifts
        self.num_variants = sum(s.num_variants for s in shifts)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.shifts]

    def __call__(self, images: Tensor, variant: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Apply variant ``v`` (1-based) to each image; images with variant 0 are left as they are.

        Each shift runs on the whole batch and its images are selected with a mask: on small
        images that costs less than gathering subsets, and it needs no device-to-host sync.
        """
        out = images
        first = 1
        for shift in self.shifts:
            mine = (variant >= first) & (variant < first + shift.num_variants)
            shifted = shift(images, (variant - first).clamp(0, shift.num_variants - 1), generator)
            out = torch.where(mine.view(-1, 1, 1, 1), shifted, out)
            first += shift.num_variants
        return out


# ----------------------------------------------------------------------------- the registry
class ShiftEntry(NamedTuple):
    """A registered shift: what builds it and one line for ``--help`` and the docs."""

    factory: Callable[[], Shift]
    description: str


AUTO = "auto"
"""The shift name that :func:`firm.shift_choice.choose_shifts` resolves from the normal images (not a shift itself)."""

SHIFTS: Registry[ShiftEntry] = Registry("shift", {
    "rotation": ShiftEntry(Rotation, "rotations by 90, 180 and 270 degrees, three outlier kinds (the paper's default)"),
    "hflip": ShiftEntry(HorizontalFlip, "horizontal mirror image (the authors')"),
    "cutpaste": ShiftEntry(CutPaste, "a rectangle of 2-15% of the image, aspect 0.3-3.3, copied elsewhere in it "
                                     "(the authors' CutPaste; always pasted, as their outliers)"),
    "cutpaste_scar": ShiftEntry(CutPasteScar, "a 2-16 x 10-25 px scar cut from the image, colour-jittered, turned by "
                                              "up to 45 degrees and pasted elsewhere (the authors' CutPaste-scar)"),
    "scramble": ShiftEntry(Scramble, "4x4 cells each turned or flipped at random, then half the time a run of them "
                                     "shuffled (the authors' scramble)"),
    "mixup": ShiftEntry(Mixup, "a blend with another normal image, weight ~ Beta(0.4, 0.4) (the authors' mixup)"),
    "permutation": ShiftEntry(PatchPermutation, "2x2 patches shuffled, never in place (ours, not the authors': "
                                                "theirs is scramble)"),
}, keywords={AUTO: "chosen from the normal images: rotation if they have an orientation, else cut-paste defects"})


def build_shifts(names: list[str] | str) -> ShiftSet:
    """A :class:`ShiftSet` from registered names such as ``["rotation"]`` or ``"rotation,cutpaste"``."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if AUTO in names:
        raise ValueError(f"shifts {AUTO!r} must be resolved from the normal images first: "
                         "firm.shift_choice.choose_shifts(images) returns the shift names to build")
    return ShiftSet([SHIFTS.get(n).factory() for n in names])
