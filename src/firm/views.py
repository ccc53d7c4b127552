"""Views: the authors' augmentation recipe, applied to whole batches on the model's device.

Each function takes float images in [0, 1], shape ``(B, C, H, W)``, and a ``torch.Generator``
on the images' device, and draws one set of parameters per image. Nothing loops over images in
Python: a crop is one ``grid_sample``, a blur one grouped convolution, colour jitter a handful of
element-wise operations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ViewConfig", "ViewAugment", "random_resized_crop", "color_jitter", "gaussian_blur", "grey"]


def _uniform(shape, low: float, high: float, images: Tensor, generator) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=images.device, dtype=images.dtype)


def random_resized_crop(images: Tensor, size: int, scale: tuple[float, float] = (0.25, 1.0),
                        ratio: tuple[float, float] = (1.0, 1.0), generator: torch.Generator | None = None) -> Tensor:
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio``, resized to ``size``."""
    b, _, h, w = images.shape
    area = _uniform(b, *scale, images, generator)
    log_r = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), images, generator)
    r = log_r.exp()
    # Crop width and height as fractions of the image side, clipped to fit (torchvision's fallback).
    cw = (area * r * h / w).sqrt().clamp(max=1.0)
    ch = (area / r * w / h).sqrt().clamp(max=1.0)
    cx = (1 - cw) * (2 * torch.rand(b, generator=generator, device=images.device, dtype=images.dtype) - 1)
    cy = (1 - ch) * (2 * torch.rand(b, generator=generator, device=images.device, dtype=images.dtype) - 1)
    theta = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = cw, cx, ch, cy
    grid = F.affine_grid(theta, [b, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grey(images: Tensor) -> Tensor:
    """Luminance ``(B, 1, H, W)`` of RGB images (ITU-R 601 weights); grey images as they are."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _shift_hue(images: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of RGB images by ``shift`` (fraction of the colour wheel, per image)."""
    r, g, b = images.unbind(1)
    maxc, _ = images.max(1)
    minc, _ = images.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(maxc == r, (g - b) / safe,
                      torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue))
    hue = (hue + shift.view(-1, 1, 1)) % 1.0
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    # HSV back to RGB in closed form: channel n takes v - v*s*clamp(min(k, 4-k), 0, 1), k = (n + 6h) mod 6.
    n = torch.tensor([5.0, 3.0, 1.0], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    k = (n + 6 * hue.unsqueeze(1)) % 6
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return maxc.unsqueeze(1) * (1 - sat.unsqueeze(1) * ramp)


def color_jitter(images: Tensor, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 hue: float = 0.4, p: float = 1.0, generator: torch.Generator | None = None,
                 host_generator: torch.Generator | None = None) -> Tensor:
    """torchvision-style colour jitter, the four adjustments in a random order per batch.

    Factors are drawn per image: brightness, contrast and saturation in ``[1-x, 1+x]``, hue shift
    in ``[-hue, hue]``; each image is jittered with probability ``p``. The order is drawn on the
    host from ``host_generator`` (default: ``generator`` if it is a CPU one, else torch's global
    RNG), so that no device sync is needed.
    """
    b = images.shape[0]
    apply = torch.rand(b, generator=generator, device=images.device) < p

    def factor(x: float) -> Tensor:
        f = _uniform(b, max(0.0, 1 - x), 1 + x, images, generator)
        return torch.where(apply, f, torch.ones_like(f)).view(b, 1, 1, 1)

    def blend(img: Tensor, other: Tensor, f: Tensor) -> Tensor:
        return (f * img + (1 - f) * other).clamp(0, 1)

    ops = {
        "brightness": lambda img, f: (img * f).clamp(0, 1),
        "contrast": lambda img, f: blend(img, grey(img).mean((1, 2, 3), keepdim=True), f),
        "saturation": lambda img, f: blend(img, grey(img), f),
    }
    factors = {"brightness": factor(brightness), "contrast": factor(contrast), "saturation": factor(saturation)}
    colour = images.shape[1] == 3
    names = ["brightness", "contrast"] + (["saturation", "hue"] if colour else [])
    if host_generator is None and generator is not None and generator.device.type == "cpu":
        host_generator = generator
    order = torch.randperm(len(names), generator=host_generator)
    for i in order.tolist():
        name = names[i]
        if name == "hue":
            if hue > 0:
                shift = torch.where(apply, _uniform(b, -hue, hue, images, generator), torch.zeros(b, device=images.device))
                images = _shift_hue(images, shift)
        else:
            images = ops[name](images, factors[name])
    return images


def gaussian_blur(images: Tensor, kernel_size: int = 3, sigma: tuple[float, float] = (0.1, 2.0), p: float = 0.75,
                  generator: torch.Generator | None = None) -> Tensor:
    """Gaussian blur with a per-image sigma, applied to each image with probability ``p``."""
    b, c, h, w = images.shape
    s = _uniform(b, *sigma, images, generator)
    apply = torch.rand(b, generator=generator, device=images.device) < p
    x = torch.arange(kernel_size, device=images.device, dtype=images.dtype) - (kernel_size - 1) / 2
    k = torch.exp(-(x.view(1, -1) ** 2) / (2 * s.view(-1, 1) ** 2))
    k = k / k.sum(1, keepdim=True)
    identity = (x == 0).to(images.dtype).expand(b, -1)
    k = torch.where(apply.view(b, 1), k, identity)
    k = k.repeat_interleave(c, 0)  # one kernel per (image, channel) for a grouped convolution
    pad = kernel_size // 2
    flat = F.pad(images.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, k.view(b * c, 1, 1, kernel_size), groups=b * c)
    flat = F.conv2d(flat, k.view(b * c, 1, kernel_size, 1), groups=b * c)
    return flat.view(b, c, h, w)


@dataclass
class ViewConfig:
    """The view recipe; the defaults are the authors' (docs/method.md)."""

    size: int = 32
    crop_scale: tuple[float, float] = (0.25, 1.0)
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.4)
    jitter_p: float = 1.0
    blur_kernel: int = 3
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: float = 0.75


class ViewAugment:
    """Random view of a batch: resized crop, colour jitter, Gaussian blur (no flip)."""

    def __init__(self, config: ViewConfig | None = None):
        self.config = config or ViewConfig()

    def __call__(self, images: Tensor, generator: torch.Generator | None = None,
                 host_generator: torch.Generator | None = None) -> Tensor:
        c = self.config
        x = random_resized_crop(images, c.size, c.crop_scale, c.crop_ratio, generator)
        x = color_jitter(x, *c.jitter, p=c.jitter_p, generator=generator, host_generator=host_generator)
        if c.blur_p > 0:
            x = gaussian_blur(x, c.blur_kernel, c.blur_sigma, c.blur_p, generator)
        return x
