"""The one feature-extraction path that every scorer uses, with its test-time ensembles.

Images (uint8) become floats in [0, 1] and get the test-time zoom of :class:`~firm.config.EvalConfig`
(``center_crop``: resize to ``round(size / center_crop)``, keep the centre ``size``; the authors'
Resize(36) + CenterCrop(32)), the bank and the queries alike. A test-time ensemble
(:data:`TTA_MODES`) then decides the views: rotations by multiples of 90 degrees ("angled": each
rotated test image is compared with the training features at the same rotation) and, for the
queries only, random resized crops of the zoomed image ("ensemble"). As in the authors'
evaluation, crops are cut from the upright image and then rotated, so with
``ensemble_shared_crops`` every rotation sees the same crops.

The result is a :class:`FeatureSet` of raw (not normalised) backbone features with shape
``(rotations, views, N, D)``.

Resizing is ``F.interpolate(mode="bilinear", align_corners=False, antialias=True)``: what
torchvision's ``Resize`` does to tensors (antialias on). For the zoom (an enlargement) the
antialias filter changes nothing, so this equals plain bilinear interpolation and PIL's bilinear
resize up to uint8 rounding. Crops are :func:`~firm.views.random_resized_crop` (one bilinear
``grid_sample``, the same interpolation, crops enlarged to the image size).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .config import EvalConfig
from .models import Encoder
from .registry import Registry
from .views import random_resized_crop

__all__ = ["TestTimeEnsemble", "TTA_MODES", "FeatureSet", "extract_features", "model_device", "resize",
           "center_zoom", "zoom_size"]


@dataclass(frozen=True)
class TestTimeEnsemble:
    """One entry of :data:`TTA_MODES`: which rotations every image is seen at and whether the
    queries also get the crop ensemble (``ensemble_crops`` views per rotation, the first the plain
    zoomed image). The bank is always one view per rotation."""

    description: str
    quarter_turns: tuple[int, ...]
    crops: bool = False

    @property
    def rotations(self) -> int:
        return len(self.quarter_turns)


TTA_MODES: Registry[TestTimeEnsemble] = Registry("test-time ensemble", {
    "none": TestTimeEnsemble("the image as it is (after the test-time zoom)", (0,)),
    "angled": TestTimeEnsemble("average over rotations 0/90/180/270, each against the bank at the same rotation",
                               (0, 1, 2, 3)),
    "ensemble": TestTimeEnsemble("angled, and at each rotation the zoomed image plus random resized crops",
                                 (0, 1, 2, 3), crops=True),
})


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class FeatureSet:
    """Raw backbone features ``(rotations, views, N, D)``; rotation r is r x 90 degrees."""

    features: Tensor

    @property
    def rotations(self) -> int:
        return self.features.shape[0]

    def __len__(self) -> int:
        return self.features.shape[2]


def resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Float images ``(B, C, H, W)`` resized to ``size`` (bilinear, antialiased as torchvision's
    ``Resize`` does for tensors)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def zoom_size(side: int, center_crop: float) -> int:
    """The side an image of ``side`` pixels is resized to before its centre is cropped back to
    ``side`` (36 for 32 px at the authors' ``center_crop`` of 32/36)."""
    if not 0 < center_crop <= 1:
        raise ValueError(f"center_crop must be in (0, 1] (1 = no zoom), got {center_crop}")
    return int(round(side / center_crop))


def center_zoom(images: Tensor, center_crop: float) -> Tensor:
    """The test-time zoom: resize to ``round(side / center_crop)`` per side, then crop the centre
    back to the original size (torchvision's CenterCrop offsets). ``center_crop=1`` changes nothing."""
    h, w = images.shape[-2:]
    zh, zw = zoom_size(h, center_crop), zoom_size(w, center_crop)
    if (zh, zw) == (h, w):
        return images
    top, left = int(round((zh - h) / 2)), int(round((zw - w) / 2))
    return resize(images, (zh, zw))[..., top:top + h, left:left + w]


@torch.no_grad()
def _embed(model: Encoder, images: Tensor, mode: TestTimeEnsemble, crops: bool, config: EvalConfig,
           batch_size: int, seed: int, progress: bool) -> Tensor:
    """Features ``(rotations, views, N, D)``. With crops, view 0 is the zoomed image and views 1..
    random resized crops of it, cut upright and then rotated; one crop is alive at a time."""
    device = model_device(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    views = config.ensemble_crops if crops else 1
    scale = tuple(config.ensemble_crop_scale)
    out = torch.empty(mode.rotations, views, len(images), model.feature_dim)
    for start in tqdm(range(0, len(images), batch_size), desc="features", disable=not progress, leave=False):
        x = images[start:start + batch_size].to(device, non_blocking=True).float().div_(255)
        zoomed = center_zoom(x, config.center_crop)
        state = gen.get_state()
        for r, turns in enumerate(mode.quarter_turns):
            if config.ensemble_shared_crops:
                gen.set_state(state)  # the same crops at every rotation; else the generator runs on
            for v in range(views):
                view = zoomed if v == 0 else random_resized_crop(zoomed, zoomed.shape[-1], scale, (1.0, 1.0), gen)
                view = torch.rot90(view, turns, dims=(-2, -1)) if turns else view
                out[r, v, start:start + len(x)] = model.features(view).float().cpu()
    return out


def extract_features(model: Encoder, images: Tensor, tta: str = "none", query: bool = True, batch_size: int = 256,
                     seed: int = 0, progress: bool = False, config: EvalConfig | None = None) -> FeatureSet:
    """Backbone features of uint8 images ``(N, C, H, W)`` for test-time ensemble ``tta``.

    ``config`` supplies the zoom and the crop ensemble (default: ``EvalConfig()``, the authors'
    values); the bank and its queries must be extracted with the same ``center_crop``.
    ``query=False`` is for the training bank: rotations are applied but never random crops.
    ``seed`` fixes the random crops. The model is put in eval mode and restored afterwards.
    """
    mode = TTA_MODES.get(tta)
    config = config or EvalConfig()
    zoom_size(images.shape[-1], config.center_crop)  # a bad center_crop fails before any forward pass
    crops = mode.crops and query
    if crops and config.ensemble_crops < 1:
        raise ValueError(f"ensemble_crops must be at least 1, got {config.ensemble_crops}")
    was_training = model.training
    model.eval()
    try:
        feats = _embed(model, images, mode, crops, config, batch_size, seed, progress)
    finally:
        model.train(was_training)
    return FeatureSet(feats)
