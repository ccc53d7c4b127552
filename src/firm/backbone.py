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
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["StagedBackbone", "check_stages"]


def check_stages(stages: Sequence[int] | int, count: int = 4) -> list[int]:
    """``stages`` as a list of 1-indexed stage numbers, each in 1..count; a ValueError otherwise."""
    wanted = [int(s) for s in (stages if isinstance(stages, Iterable) else [stages])]
    if not wanted or any(s < 1 or s > count for s in wanted):
        raise ValueError(f"stages are numbered 1..{count}, got {list(wanted)}")
    return wanted


def _fold_batchnorm(module: nn.Module) -> fx.GraphModule:
    """``module`` (in eval mode) traced, with each BatchNorm2d whose input is a Conv2d's output,
    used nowhere else, folded into that convolution."""
    graph = fx.symbolic_trace(module)
    modules = dict(graph.named_modules())
    for node in list(graph.graph.nodes):
        source = node.args[0] if node.op == "call_module" and node.args else None
        if (isinstance(modules.get(node.target), nn.BatchNorm2d) and isinstance(source, fx.Node)
                and source.op == "call_module" and isinstance(modules.get(source.target), nn.Conv2d)
                and len(source.users) == 1):
            conv_name = source.target
            parent, _, name = conv_name.rpartition(".")
            setattr(graph.get_submodule(parent), name, fuse_conv_bn_eval(modules[conv_name], modules[node.target]))
            node.replace_all_uses_with(source)
            graph.graph.erase_node(node)
    graph.delete_all_unused_submodules()
    graph.recompile()
    return graph


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

    def fold_batchnorm(self) -> "StagedBackbone":
        """Fold every BatchNorm that follows a convolution into that convolution, in place, and
        return the backbone, in eval mode. For inference only: the running statistics are baked
        into the weights, so training or saving the result is wrong. The function is the same to
        rounding, with one pass fewer over each feature map."""
        self.eval()
        self.stem = _fold_batchnorm(self.stem)
        self.stages = nn.Sequential(*(_fold_batchnorm(stage) for stage in self.stages))
        return self

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
