"""Encoder: a CIFAR-style ResNet-18 backbone and the projection head used only for training."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .serialization import DictConfig

__all__ = ["ModelConfig", "ResNet18", "ProjectionHead", "Encoder"]


@dataclass
class ModelConfig(DictConfig):
    """Architecture of an :class:`Encoder`; the defaults are the paper's."""

    width: int = 64
    head_hidden: int = 1024
    head_layers: int = 7
    head_out: int = 128
    in_channels: int = 3
    image_size: int = 32

    def __post_init__(self):
        for name in ("width", "head_out", "in_channels", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        if self.head_layers < 0 or (self.head_layers and self.head_hidden < 1):
            raise ValueError(f"model config: bad head ({self.head_layers} layers of width {self.head_hidden})")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stride-1 stem, no max-pool, stages of width w, 2w, 4w, 8w.

    Takes images in [0, 1] and normalises them itself, so exported models need no preprocessing
    beyond resizing.
    """

    def __init__(self, width: int = 64, in_channels: int = 3):
        super().__init__()
        self.out_dim = 8 * width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.stages = nn.Sequential(*stages)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x * 2 - 1))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class ProjectionHead(nn.Module):
    """MLP head: ``layers`` x (Linear, BatchNorm, ReLU), then Linear to ``out_dim`` and a
    non-affine BatchNorm (the authors' head with 7 hidden layers of 1024)."""

    def __init__(self, in_dim: int, hidden: int = 1024, layers: int = 7, out_dim: int = 128):
        super().__init__()
        blocks, d = [], in_dim
        for _ in range(layers):
            blocks += [nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU()]
            d = hidden
        blocks += [nn.Linear(d, out_dim), nn.BatchNorm1d(out_dim, affine=False)]
        self.net = nn.Sequential(*blocks)

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


class Encoder(nn.Module):
    """Backbone plus projection head.

    ``forward`` returns the L2-normalised projection used by the contrastive loss; ``features``
    returns the backbone features that scoring uses (the head is discarded after training).
    """

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config or ModelConfig()
        c = self.config
        self.backbone = ResNet18(c.width, c.in_channels)
        self.head = ProjectionHead(self.backbone.out_dim, c.head_hidden, c.head_layers, c.head_out)

    @property
    def feature_dim(self) -> int:
        return self.backbone.out_dim

    def features(self, x: Tensor) -> Tensor:
        """Backbone features (not normalised) of images in [0, 1]."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        z = self.head(self.backbone(x))
        if z.dtype in (torch.float16, torch.bfloat16):
            z = z.float()  # normalise and compare in float32 under autocast
        return F.normalize(z, dim=1)
