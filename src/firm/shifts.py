"""Synthetic outliers: distribution-shifting transforms and the batch composition that uses them.

A :class:`Shift` turns a batch of ID images into outliers. It may have several *variants*
(rotation has three: 90, 180 and 270 degrees); every variant is one synthetic outlier kind and,
for Rot-SupCon, one label. Shifts work on whole batches of float images ``(B, C, H, W)`` on any
device, with one call per variant rather than one per image.

:class:`BatchPlan` decides which image and which variant (0 = the unshifted inlier) fills each
slot of every batch, from a seeded generator, so an epoch's order can be rebuilt on resume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Shift", "Rotation", "HorizontalFlip", "CutPaste", "PatchPermutation", "ShiftSet",
    "SHIFT_NAMES", "build_shifts", "BatchPlan",
]


class Shift:
    """A distribution-shifting transform with ``num_variants`` outlier kinds."""

    name: str = "shift"
    num_variants: int = 1

    def __call__(self, images: Tensor, variant: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Shift each image by its variant (``0 <= variant < num_variants``); returns a new batch."""
        raise NotImplementedError


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


def _uniform(n: int, low: float, high: float, generator, device) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


class CutPaste(Shift):
    """CutPaste (Li et al., 2021): a patch cut from the image is pasted elsewhere in it.

    ``scar=True`` gives CutPaste-scar: a thin, long, randomly rotated patch. Sizes are fractions
    of the image side, so the same settings serve 32 px and 256 px images.
    """

    name = "cutpaste"

    def __init__(self, area: tuple[float, float] = (0.02, 0.15), aspect: tuple[float, float] = (0.3, 3.3),
                 scar: bool = False, scar_width: tuple[float, float] = (0.03, 0.1),
                 scar_length: tuple[float, float] = (0.25, 0.5), scar_angle: float = 45.0):
        self.area, self.aspect, self.scar = area, aspect, scar
        self.scar_width, self.scar_length, self.scar_angle = scar_width, scar_length, scar_angle
        if scar:
            self.name = "cutpaste_scar"

    def __call__(self, images: Tensor, variant: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b, _, h, w = images.shape
        dev = images.device
        side = float(min(h, w))
        if self.scar:
            pw = _uniform(b, *self.scar_width, generator, dev) * side
            ph = _uniform(b, *self.scar_length, generator, dev) * side
            angle = _uniform(b, -self.scar_angle, self.scar_angle, generator, dev) * math.pi / 180
        else:
            area = _uniform(b, *self.area, generator, dev) * h * w
            log_ratio = _uniform(b, math.log(self.aspect[0]), math.log(self.aspect[1]), generator, dev)
            ratio = log_ratio.exp()
            pw = (area * ratio).sqrt().clamp(max=w - 1)
            ph = (area / ratio).sqrt().clamp(max=h - 1)
            angle = torch.zeros(b, device=dev)
        # Half extents of the patch's bounding box; a rotated scar may point any way.
        hx, hy = (torch.maximum(pw, ph) / 2,) * 2 if self.scar else (pw / 2, ph / 2)

        def centre(limit: int, half: Tensor) -> Tensor:
            return half + torch.rand(b, generator=generator, device=dev) * (limit - 2 * half).clamp(min=0)

        src_x, src_y, dst_x, dst_y = centre(w, hx), centre(h, hy), centre(w, hx), centre(h, hy)

        ys = torch.arange(h, device=dev, dtype=torch.float32).view(1, h, 1) + 0.5
        xs = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, w) + 0.5
        dx, dy = xs - dst_x.view(b, 1, 1), ys - dst_y.view(b, 1, 1)
        cos, sin = angle.cos().view(b, 1, 1), angle.sin().view(b, 1, 1)
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # pixel in the patch's own frame
        inside = (u.abs() <= pw.view(b, 1, 1) / 2) & (v.abs() <= ph.view(b, 1, 1) / 2)
        sx = (src_x.view(b, 1, 1) + dx).floor().long().clamp(0, w - 1)
        sy = (src_y.view(b, 1, 1) + dy).floor().long().clamp(0, h - 1)
        batch = torch.arange(b, device=dev).view(b, 1, 1)
        moved = images.permute(0, 2, 3, 1)[batch, sy, sx].permute(0, 3, 1, 2)
        return torch.where(inside.unsqueeze(1), moved, images)


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


SHIFT_NAMES = ("rotation", "hflip", "cutpaste", "cutpaste_scar", "permutation")


def build_shifts(names: list[str] | str) -> ShiftSet:
    """A :class:`ShiftSet` from names such as ``["rotation"]`` or ``"rotation,cutpaste"``."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    factories = {
        "rotation": Rotation, "hflip": HorizontalFlip, "cutpaste": CutPaste,
        "cutpaste_scar": lambda: CutPaste(scar=True), "permutation": PatchPermutation,
    }
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise ValueError(f"unknown shift(s) {unknown}; choose from {', '.join(SHIFT_NAMES)}")
    return ShiftSet([factories[n]() for n in names])


@dataclass
class BatchPlan:
    """Which source image and which variant fill each batch slot, epoch by epoch.

    ``id_share=None`` is the authors' composition: the epoch's pool holds every ID image once
    unshifted and once per outlier variant (so with three rotations 1/4 of a batch is ID), shuffled
    and cut into batches. With ``id_share=p`` each batch holds ``round(p * batch_size)`` inliers,
    walking through a permutation of the ID images once per epoch, and the other slots are
    outliers made from random images with random variants.
    ``outlier_sources`` is the number of images outliers are drawn from (the ID images for shifts,
    an auxiliary set for Outlier Exposure).
    """

    num_images: int
    batch_size: int
    num_variants: int
    id_share: float | None = None
    outlier_sources: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.num_images < 1:
            raise ValueError("the training set is empty: there are no normal images to train on")
        if self.id_share is not None and not 0 < self.id_share < 1:
            raise ValueError(f"id_share must be in (0, 1), got {self.id_share}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2, got {self.batch_size}")
        if self.outlier_sources is None:
            self.outlier_sources = self.num_images

    @property
    def inliers_per_batch(self) -> int:
        if self.id_share is None:
            return self.batch_size
        return max(1, min(self.batch_size - 1, round(self.id_share * self.batch_size)))

    def steps_per_epoch(self) -> int:
        """Number of full batches in an epoch (a last partial batch is dropped)."""
        if self.id_share is None:
            return max(1, self.num_images * (1 + self.num_variants) // self.batch_size)
        return max(1, math.ceil(self.num_images / self.inliers_per_batch))

    def epoch(self, epoch: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """``(source_index, variant)``, each ``(steps, batch_size)``; variant 0 = inlier.

        For inliers ``source_index`` indexes the ID images, for outliers the outlier sources.
        """
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + epoch)
        steps, b = self.steps_per_epoch(), self.batch_size
        if self.id_share is None:
            size = self.num_images * (1 + self.num_variants)
            # A pool smaller than one batch (few images, large batch) is drawn several times over.
            pool = torch.cat([torch.randperm(size, generator=gen) for _ in range(math.ceil(steps * b / size))])
            pool = pool[: steps * b]
            index, variant = pool % self.num_images, pool // self.num_images
            if self.outlier_sources != self.num_images:
                random_source = torch.randint(self.outlier_sources, (len(pool),), generator=gen)
                index = torch.where(variant > 0, random_source, index)
        else:
            k = self.inliers_per_batch
            reps = math.ceil(steps * k / self.num_images)
            inliers = torch.cat([torch.randperm(self.num_images, generator=gen) for _ in range(reps)])[: steps * k]
            outliers = torch.randint(self.outlier_sources, (steps * (b - k),), generator=gen)
            out_variant = torch.randint(1, self.num_variants + 1, (steps * (b - k),), generator=gen)
            index = torch.cat([inliers.view(steps, k), outliers.view(steps, b - k)], 1)
            variant = torch.cat([torch.zeros(steps, k, dtype=torch.long), out_variant.view(steps, b - k)], 1)
        return index.view(steps, b).to(device), variant.view(steps, b).to(device)
