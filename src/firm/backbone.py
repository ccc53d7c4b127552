"""What every backbone shares: a stem, four stages at strides 4-32 (or 1-8 with the CIFAR stem),
pooled features from the last stage, the maps of chosen stages, and fine-tuning controls (the
stem and the first ``frozen_stages`` stages frozen, BatchNorm statistics held fixed).

A backbone subclasses :class:`StagedBackbone` and sets ``stem``, ``stages`` (an
``nn.Sequential`` of four stages), ``stage_dims``, ``out_dim`` and :meth:`normalize`.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["StagedBackbone", "check_stages"]


def check_stages(stages: Sequence[int] | int, count: int = 4) -> list[int]:
    """``stages`` as a list of 1-indexed stage numbers, each in 1..count; a ValueError otherwise."""
    wanted = [int(s) for s in (stages if isinstance(stages, Iterable) else [stages])]
    if not wanted or any(s < 1 or s > count for s in wanted):
        raise ValueError(f"stages are numbered 1..{count}, got {list(wanted)}")
    return wanted


class StagedBackbone(nn.Module):
    """Base of the backbones: images in [0, 1] -> :meth:`normalize` -> stem -> stages."""

    stem: nn.Module
    stages: nn.Sequential
    stage_dims: list[int]
    out_dim: int

    def __init__(self):
        super().__init__()
        self.frozen_stages = 0
        self.bn_stats_frozen = False

    def normalize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features ``(B, out_dim)`` of images in [0, 1]."""
        x = self.stages(self.stem(self.normalize(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def feature_maps(self, x: Tensor, stages: Sequence[int] = (2, 3)) -> list[Tensor]:
        """Spatial outputs ``(B, C_s, H_s, W_s)`` of the 1-indexed ``stages``, in the order given;
        stages after the last one asked for are not run."""
        wanted = check_stages(stages, len(self.stages))
        x = self.stem(self.normalize(x))
        outs: dict[int, Tensor] = {}
        for i in range(1, max(wanted) + 1):
            x = self.stages[i - 1](x)
            outs[i] = x
        return [outs[s] for s in wanted]

    def map_dims(self, stages: Sequence[int] = (2, 3)) -> list[int]:
        """Channel counts of :meth:`feature_maps` for ``stages``."""
        return [self.stage_dims[s - 1] for s in check_stages(stages, len(self.stages))]

    def frozen_modules(self) -> list[nn.Module]:
        """The stem and the first ``frozen_stages`` stages (empty when nothing is frozen)."""
        k = self.frozen_stages
        return [self.stem, *self.stages[:k]] if k > 0 else []

    def train(self, mode: bool = True) -> "StagedBackbone":
        """As :meth:`nn.Module.train`, but frozen parts (and every BatchNorm once their statistics
        are frozen) stay in eval mode, so their running statistics do not move."""
        super().train(mode)
        if mode:
            for module in self.frozen_modules():
                module.eval()
            if self.bn_stats_frozen:
                for module in self.modules():
                    if isinstance(module, _BatchNorm):
                        module.eval()
        return self
