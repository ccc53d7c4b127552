"""The one feature-extraction path that every scorer uses, with its test-time ensembles.

Images (uint8) go through the backbone in batches, optionally rotated ("angled": each rotated
test image is compared with training features at the same rotation) and randomly cropped
("ensemble": 4 rotations x 10 crops). The result is a :class:`FeatureSet` of raw (not
normalised) backbone features with shape ``(rotations, crops, N, D)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .models import Encoder
from .views import random_resized_crop

__all__ = ["TTA_MODES", "FeatureSet", "extract_features", "model_device"]

TTA_MODES = ("none", "angled", "ensemble")
_ENSEMBLE_CROPS = 10
_ENSEMBLE_CROP_SCALE = (0.5, 1.0)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class FeatureSet:
    """Raw backbone features ``(rotations, crops, N, D)``; rotation r is r x 90 degrees."""

    features: Tensor

    @property
    def rotations(self) -> int:
        return self.features.shape[0]

    def __len__(self) -> int:
        return self.features.shape[2]


@torch.no_grad()
def _embed(model: Encoder, images: Tensor, batch_size: int, quarter_turns: int, crops: int, seed: int,
           progress: bool, desc: str) -> Tensor:
    device = model_device(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(max(crops, 1), len(images), model.feature_dim)
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        x = images[start:start + batch_size].to(device, non_blocking=True).float().div_(255)
        if quarter_turns:
            x = torch.rot90(x, quarter_turns, dims=(-2, -1))
        if crops:
            for c in range(crops):
                view = random_resized_crop(x, x.shape[-1], _ENSEMBLE_CROP_SCALE, (1.0, 1.0), gen)
                out[c, start:start + len(x)] = model.features(view).float().cpu()
        else:
            out[0, start:start + len(x)] = model.features(x).float().cpu()
    return out


def extract_features(model: Encoder, images: Tensor, tta: str = "none", query: bool = True, batch_size: int = 256,
                     seed: int = 0, progress: bool = False) -> FeatureSet:
    """Backbone features of uint8 images ``(N, C, H, W)`` for test-time ensemble ``tta``.

    ``query=False`` is for the training bank: rotations are applied but never random crops.
    The model is put in eval mode for the extraction and restored afterwards.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"unknown test-time ensemble {tta!r}; choose one of {', '.join(TTA_MODES)}")
    turns = range(4) if tta in ("angled", "ensemble") else range(1)
    crops = _ENSEMBLE_CROPS if (tta == "ensemble" and query) else 0
    was_training = model.training
    model.eval()
    try:
        feats = [_embed(model, images, batch_size, k, crops, seed + k, progress, f"features (rot {90 * k})") for k in turns]
    finally:
        model.train(was_training)
    return FeatureSet(torch.stack(feats))
