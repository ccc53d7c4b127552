"""Encoders: a ResNet backbone (CIFAR or ImageNet stem) and the projection head used only for training.

Everything is built from :class:`firm.config.ModelConfig`: :data:`BACKBONES` names the
architectures, :func:`resolve_stem` picks the stem, every BatchNorm gets ``bn_momentum``, ``init``
chooses the authors' initialisation or PyTorch's, ``weights`` starts the backbone from a
torchvision-layout state dict (:func:`load_pretrained`, never an unrestricted unpickle) and
``frozen_stages`` keeps the first stages fixed (:func:`freeze_stages`).

Parameter names of the CIFAR ResNet-18 (``backbone.stem.*``, ``backbone.stages.*``,
``...shortcut.*``, ``head.net.*``) are those of earlier firm versions, so saved model folders
stay loadable.
"""
from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .config import ModelConfig, check_ranges
from .backbone import StagedBackbone
from .efficientnet import EfficientNetLite0, load_packaged
from .registry import Registry
from .serialization import WeightsError

__all__ = ["ModelConfig", "BACKBONES", "STEMS", "INITS", "AUTO_STEM", "AUTO_STEM_MAX_SIZE", "IMAGENET_MEAN", "IMAGENET_STD",
           "WeightsError", "BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50", "ProjectionHead", "Encoder",
           "resolve_stem", "input_stats", "build_backbone", "init_weights", "torchvision_key",
           "read_state_dict", "load_pretrained", "freeze_stages", "freeze_bn_stats"]

AUTO_STEM = "auto"
AUTO_STEM_MAX_SIZE = 64
"""``stem="auto"`` uses the CIFAR stem up to this image side and the ImageNet stem above it."""


def _cifar_stem(in_channels: int, width: int, bn_momentum: float) -> nn.Sequential:
    """3x3 convolution, stride 1 (the paper's, for 32-64 px images)."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                         nn.BatchNorm2d(width, momentum=bn_momentum), nn.ReLU())


def _imagenet_stem(in_channels: int, width: int, bn_momentum: float) -> nn.Sequential:
    """7x7 convolution, stride 2, and a max-pool (for 128-256 px images)."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
                         nn.BatchNorm2d(width, momentum=bn_momentum), nn.ReLU(), nn.MaxPool2d(3, 2, 1))


STEMS: Registry[Callable[[int, int, float], nn.Sequential]] = Registry(
    "stem", {"cifar": _cifar_stem, "imagenet": _imagenet_stem},
    keywords={AUTO_STEM: f"cifar up to {AUTO_STEM_MAX_SIZE} px, imagenet above"})
"""A ResNet's first layers by name: ``stem(in_channels, width, bn_momentum)``."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HALF = ((0.5,), (0.5,))  # x * 2 - 1: what firm's networks trained from scratch have always used
_NUM_STAGES = 4


# ---------------------------------------------------------------------------------------------
# Building blocks


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34); ``planes`` output channels."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, bn_momentum: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes, momentum=bn_momentum))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's ResNet v1.5), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, bn_momentum: float = 0.1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout, momentum=bn_momentum))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(StagedBackbone):
    """ResNet backbone: a stem, 4 stages of width w, 2w, 4w, 8w (times the block's expansion),
    global average pooling.

    ``stem="cifar"``: 3x3 stride-1 convolution, no max-pool (the paper's, for 32 px).
    ``stem="imagenet"``: 7x7 stride-2 convolution and a 3x3 stride-2 max-pool (torchvision's), so
    128 px images give the final 4x4 map that 32 px give the CIFAR stem.

    Takes images in [0, 1] and normalises them itself (``(x - mean) / std``, buffers that are not
    saved; :func:`input_stats` picks them), so exported models need no preprocessing beyond resizing.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int], width: int = 64,
                 in_channels: int = 3, stem: str = "cifar", bn_momentum: float = 0.1,
                 mean: Sequence[float] = _HALF[0], std: Sequence[float] = _HALF[1]):
        super().__init__()
        if len(layers) != _NUM_STAGES:
            raise ValueError(f"a ResNet has {_NUM_STAGES} stages, got block counts {list(layers)}")
        self.stem = STEMS.get(stem)(in_channels, width, bn_momentum)  # 'auto' is resolved before (resolve_stem)
        self.stem_kind = stem
        stages, cin = [], width
        for i, blocks in enumerate(layers):
            planes = width * 2 ** i
            stage = []
            for j in range(blocks):
                stage.append(block(cin, planes, 2 if (i > 0 and j == 0) else 1, bn_momentum))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.stage_dims = [width * 2 ** i * block.expansion for i in range(_NUM_STAGES)]
        self.out_dim = self.stage_dims[-1]
        mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        if mean_t.numel() != std_t.numel() or mean_t.numel() not in (1, in_channels):
            raise ValueError(f"input mean/std need 1 or {in_channels} values, got {mean_t.numel()} and {std_t.numel()}")
        # x * scale + shift == (x - mean) / std; with mean = std = 0.5 it is exactly the old x * 2 - 1
        self.register_buffer("in_scale", (1 / std_t).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("in_shift", (-mean_t / std_t).view(1, -1, 1, 1), persistent=False)
        self.arch = f"ResNet({block.__name__}, {list(layers)})"  # the builders put their name here

    def normalize(self, x: Tensor) -> Tensor:
        return x * self.in_scale + self.in_shift


def resnet18(width: int = 64, **kwargs) -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2) at base width ``width``; ``kwargs`` go to :class:`ResNet`."""
    net = ResNet(BasicBlock, (2, 2, 2, 2), width, **kwargs)
    net.arch = "resnet18"
    return net


def resnet50(width: int = 64, **kwargs) -> ResNet:
    """ResNet-50 (Bottleneck with expansion 4, 3-4-6-3) at base width ``width``."""
    net = ResNet(Bottleneck, (3, 4, 6, 3), width, **kwargs)
    net.arch = "resnet50"
    return net




class ProjectionHead(nn.Module):
    """MLP head: ``layers`` x (Linear, BatchNorm, ReLU), then Linear to ``out_dim`` and a
    non-affine BatchNorm (the authors' head with 7 hidden layers of 1024)."""

    def __init__(self, in_dim: int, hidden: int = 1024, layers: int = 7, out_dim: int = 128, bn_momentum: float = 0.1):
        super().__init__()
        blocks, d = [], in_dim
        for _ in range(layers):
            blocks += [nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden, momentum=bn_momentum), nn.ReLU()]
            d = hidden
        blocks += [nn.Linear(d, out_dim), nn.BatchNorm1d(out_dim, affine=False, momentum=bn_momentum)]
        self.net = nn.Sequential(*blocks)

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


# ---------------------------------------------------------------------------------------------
# From the settings


def resolve_stem(config: ModelConfig) -> str:
    """``cifar`` or ``imagenet``: ``auto`` is cifar up to :data:`AUTO_STEM_MAX_SIZE` px, imagenet above,
    so 128-256 px images cost about what 32-64 px images cost the CIFAR network."""
    STEMS.check(config.stem)
    if config.stem != AUTO_STEM:
        return config.stem
    return "cifar" if (config.input_size or config.image_size) <= AUTO_STEM_MAX_SIZE else "imagenet"


def input_stats(config: ModelConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` the backbone normalises its [0, 1] inputs with, by stem: ImageNet's for the
    ImageNet stem (what torchvision's pretrained weights expect), 0.5 / 0.5 (``x * 2 - 1``, firm's
    convention from the start) for the CIFAR stem. It depends on no other setting, so a model
    rebuilt without its pretrained ``weights`` (to load its trained state) sees the same inputs."""
    if resolve_stem(config) == "cifar":
        return _HALF
    if config.in_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)


@dataclass(frozen=True)
class BackboneEntry:
    """One entry of :data:`BACKBONES`: how to build the network from the settings and how to load
    the ``weights`` setting into it (a file, or :data:`PACKAGED` for weights that ship with a package)."""

    build: Callable[[ModelConfig], nn.Module]
    load_weights: Callable[[nn.Module, str], None]
    description: str


PACKAGED = "imagenet"
"""The ``weights`` value that loads the ImageNet weights a package ships (efficientnet_lite0)."""


def _resnet(builder: Callable[..., ResNet]) -> Callable[[ModelConfig], ResNet]:
    def build(config: ModelConfig) -> ResNet:
        mean, std = input_stats(config)
        return builder(config.width, in_channels=config.in_channels, stem=resolve_stem(config),
                       bn_momentum=config.bn_momentum, mean=mean, std=std)
    return build


def _resnet_weights(backbone: nn.Module, weights: str) -> None:
    if weights == PACKAGED:
        raise WeightsError(f"no ImageNet weights ship with firm for {backbone.arch}: pass a torchvision-layout file "
                           "(--weights resnet18.pth), or use --backbone efficientnet_lite0 --weights imagenet")
    load_pretrained(backbone, weights)


def _efficientnet_weights(backbone: nn.Module, weights: str) -> None:
    load_packaged(backbone, None if weights == PACKAGED else weights)


BACKBONES: Registry[BackboneEntry] = Registry("backbone", {
    "resnet18": BackboneEntry(_resnet(resnet18), _resnet_weights, "ResNet-18 (CIFAR or ImageNet stem, any width)"),
    "resnet50": BackboneEntry(_resnet(resnet50), _resnet_weights, "ResNet-50 (CIFAR or ImageNet stem, any width)"),
    "efficientnet_lite0": BackboneEntry(lambda c: EfficientNetLite0(c.in_channels, c.bn_momentum), _efficientnet_weights,
                                        "EfficientNet-Lite0 (fixed width; --weights imagenet: the packaged ImageNet "
                                        "weights, hash-checked)"),
})
"""Backbones by name. Every backbone takes images in [0, 1], returns pooled features from
``forward`` and the maps of four stages (strides 4-32) from ``feature_maps``."""


def build_backbone(config: ModelConfig) -> nn.Module:
    """The backbone ``config`` describes (PyTorch's initialisation; no weights loaded)."""
    return BACKBONES.get(config.backbone).build(config)


def init_weights(module: nn.Module) -> None:
    """The authors' initialisation, in place: ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``
    on every Conv2d and Linear weight, their biases 0, affine BatchNorm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


INITS: Registry[Callable[[nn.Module], None]] = Registry("initialisation", {
    "kaiming": init_weights,
    "pytorch": lambda module: None,  # each layer keeps the initialisation PyTorch gave it
})
"""Weight initialisations by name: each initialises a freshly built module in place."""


class Encoder(nn.Module):
    """Backbone plus projection head, built from a :class:`ModelConfig`.

    ``forward`` returns the L2-normalised projection used by the contrastive loss; ``features``
    returns the backbone features that scoring uses (the head is discarded after training);
    ``feature_maps`` returns spatial maps of chosen stages (patch-level anomaly maps).

    With ``config.weights`` set the backbone starts from that file (:func:`load_pretrained`); to
    load a trained model's own state, build it with ``weights=None``.
    """

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config if config is not None else ModelConfig()
        c = self.config
        check_ranges(c)
        self.backbone = build_backbone(c)
        self.head = (ProjectionHead(self.backbone.out_dim, c.head_hidden, c.head_layers, c.head_out,
                                    bn_momentum=c.bn_momentum) if c.head_out else nn.Identity())
        INITS.get(c.init)(self)
        if c.weights:
            BACKBONES.get(c.backbone).load_weights(self.backbone, c.weights)
        freeze_stages(self, c.frozen_stages)
        freeze_bn_stats(self, c.freeze_bn)

    @property
    def feature_dim(self) -> int:
        return self.backbone.out_dim

    def upsample(self, x: Tensor) -> Tensor:
        """Images resized so that their shorter side is ``config.input_size`` (bilinear; unchanged
        when it is 0 or already met). Every path into the backbone goes through it, so training
        views, the bank and the queries all reach the network at one scale."""
        size = self.config.input_size
        h, w = x.shape[-2:]
        if not size or min(h, w) == size:
            return x
        scale = size / min(h, w)
        return F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False)

    def features(self, x: Tensor) -> Tensor:
        """Backbone features ``(B, feature_dim)`` (not normalised) of images in [0, 1]."""
        return self.backbone(self.upsample(x))

    def feature_maps(self, x: Tensor, stages: Sequence[int] = (2, 3)) -> list[Tensor]:
        """Spatial outputs of the 1-indexed backbone ``stages`` of images in [0, 1], in the order given."""
        return self.backbone.feature_maps(self.upsample(x), stages)

    def map_dims(self, stages: Sequence[int] = (2, 3)) -> list[int]:
        """Channel counts of :meth:`feature_maps` for ``stages``."""
        return self.backbone.map_dims(stages)

    def for_inference(self) -> "Encoder":
        """A copy for extracting features, never for training or saving: eval mode, no
        gradients, BatchNorm folded into the convolutions (:meth:`StagedBackbone.fold_batchnorm`)
        and channels-last weights, the layout that oneDNN (CPU) and cuDNN convolutions run fastest in."""
        twin = copy.deepcopy(self).eval().requires_grad_(False)
        twin.backbone.fold_batchnorm()
        return twin.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        z = self.head(self.features(x))
        if z.dtype in (torch.float16, torch.bfloat16):
            z = z.float()  # normalise and compare in float32 under autocast
        return F.normalize(z, dim=1)


def _backbone_of(model: nn.Module) -> StagedBackbone:
    backbone = model.backbone if isinstance(model, Encoder) else model
    if not isinstance(backbone, StagedBackbone):
        raise TypeError(f"expected an Encoder or a ResNet backbone, got {type(model).__name__}")
    return backbone


# ---------------------------------------------------------------------------------------------
# Fine-tuning a pretrained backbone


def freeze_stages(model: nn.Module, k: int) -> None:
    """Freeze the stem and the first ``k`` stages of ``model``'s backbone (an Encoder or a ResNet):
    ``requires_grad=False`` and BatchNorm kept in eval mode even under ``model.train()``. The rest
    of the backbone is made trainable; ``k=0`` unfreezes everything."""
    backbone = _backbone_of(model)
    if not 0 <= k <= _NUM_STAGES:
        raise ValueError(f"frozen_stages must be in 0..{_NUM_STAGES}, got {k}")
    backbone.frozen_stages = k
    frozen = {id(p) for m in backbone.frozen_modules() for p in m.parameters()}
    for p in backbone.parameters():
        p.requires_grad_(id(p) not in frozen)
    backbone.train(backbone.training)


def freeze_bn_stats(model: nn.Module, frozen: bool = True) -> None:
    """Keep the running statistics of every backbone BatchNorm fixed (eval-mode BatchNorm even
    under ``model.train()``; their affine weights still train), as MSC and PANDA fine-tune a
    pretrained network. The projection head is not affected."""
    backbone = _backbone_of(model)
    backbone.bn_stats_frozen = bool(frozen)
    backbone.train(backbone.training)


# ---------------------------------------------------------------------------------------------
# Pretrained weights in torchvision's layout


def torchvision_key(name: str) -> str:
    """torchvision's name of our backbone state-dict key ``name`` (``stem.0.weight`` ->
    ``conv1.weight``, ``stages.1.0.shortcut.1.bias`` -> ``layer2.0.downsample.1.bias``)."""
    m = re.fullmatch(r"stem\.(\d+)\.(.+)", name)
    if m:
        return {"0": "conv1", "1": "bn1"}[m.group(1)] + "." + m.group(2)
    m = re.fullmatch(r"stages\.(\d+)\.(\d+)\.(.+)", name)
    if not m:
        raise ValueError(f"{name!r} is not a ResNet backbone key")
    rest = re.sub(r"^shortcut\.", "downsample.", m.group(3))
    return f"layer{int(m.group(1)) + 1}.{m.group(2)}.{rest}"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` dict from ``.safetensors`` or from ``.pth`` / ``.pt`` read with
    ``torch.load(weights_only=True)``; anything else is refused with a :class:`WeightsError`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"pretrained weights {path} do not exist; check the --weights path")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"pretrained weights {path} are not a valid safetensors file ({e})") from e
    elif suffix in (".pth", ".pt"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise WeightsError(f"pretrained weights {path} hold objects other than tensors, which firm refuses to "
                               f"unpickle; save only the state dict (torch.save(model.state_dict(), ...)) or convert "
                               f"it to .safetensors") from e
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise WeightsError(f"pretrained weights {path} are not a readable PyTorch file ({e})") from e
    else:
        raise WeightsError(f"pretrained weights {path}: unknown file type {suffix or '(none)'!r}; give a .safetensors, "
                           f".pth or .pt state dict")
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                          for k, v in state.items()):
        what = (f"a dict with keys {sorted(map(str, state))[:5]}" if isinstance(state, dict)
                else f"a {type(state).__name__}")
        raise WeightsError(f"pretrained weights {path} are not a state dict of tensors (it holds {what}); save the "
                           f"model's state_dict() alone, e.g. torch.save(model.state_dict(), 'resnet18.pth')")
    return state


_TORCHVISION_ARCHS = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
                      ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101",
                      ("bottleneck", (3, 8, 36, 3)): "resnet152"}


def _describe(state: dict[str, Tensor]) -> dict:
    """What a torchvision-layout state dict looks like: architecture, stem, width, in_channels."""
    out: dict = {}
    conv1 = state.get("conv1.weight")
    if conv1 is not None and conv1.dim() == 4:
        k = conv1.shape[-1]
        out.update(width=conv1.shape[0], in_channels=conv1.shape[1],
                   stem={7: "imagenet", 3: "cifar"}.get(k, f"{k}x{k}"))
    blocks: dict[int, set[int]] = {}
    for key in state:
        m = re.match(r"layer(\d+)\.(\d+)\.", key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if blocks:
        kind = "bottleneck" if any(re.match(r"layer\d+\.\d+\.conv3\.", key) for key in state) else "basic"
        counts = tuple(len(blocks[i]) for i in sorted(blocks))
        out["backbone"] = _TORCHVISION_ARCHS.get((kind, counts), f"a ResNet with {kind} blocks {list(counts)}")
    return out


def _hint(file: dict, backbone: ResNet) -> str:
    """How to change the settings so that the model matches the file described by :func:`_describe`."""
    hints = []
    if "backbone" in file and file["backbone"] != backbone.arch:
        arch = file["backbone"]
        hints.append(f"the file holds {arch} weights: use --backbone {arch}" if arch in BACKBONES else
                     f"the file holds {arch} weights, which firm has no backbone for (choose {', '.join(BACKBONES)})")
    if "stem" in file and file["stem"] != backbone.stem_kind:
        hints.append(f"the file's first convolution is the {file['stem']} stem's: use --stem {file['stem']}"
                     if file["stem"] in STEMS else f"the file's first convolution is {file['stem']}, neither stem's")
    conv = backbone.stem[0]
    if "width" in file and file["width"] != conv.out_channels:
        hints.append(f"the file's base width is {file['width']}: use --width {file['width']}")
    if "in_channels" in file and file["in_channels"] != conv.in_channels:
        hints.append(f"the file's first convolution takes {file['in_channels']} channels, the model {conv.in_channels}")
    return "; ".join(hints)


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load a torchvision-layout ResNet state dict (``conv1``, ``bn1``, ``layerN.M.*``,
    ``layerN.M.downsample.{0,1}``; ``fc.*`` ignored) into ``model``'s backbone (an Encoder or a
    ResNet). Files whose keys or shapes do not match the backbone are refused with a
    :class:`WeightsError` that names the file and the settings to change; ``num_batches_tracked``
    may be absent (older torchvision files)."""
    backbone = _backbone_of(model)
    path = Path(path)
    state = read_state_dict(path)
    expected = backbone.state_dict()
    by_tv = {torchvision_key(k): k for k in expected}
    hint = _hint(_describe(state), backbone)
    unexpected = sorted(k for k in state if k not in by_tv and not k.startswith("fc."))
    missing = sorted(tv for tv, ours in by_tv.items() if tv not in state and not ours.endswith("num_batches_tracked"))
    wrong = [f"{tv} {tuple(state[tv].shape)} in the file vs {tuple(expected[ours].shape)} in the model"
             for tv, ours in by_tv.items() if tv in state and state[tv].shape != expected[ours].shape]
    if unexpected or missing or wrong:
        if not any(k in by_tv for k in state):
            detail = (f"none of its keys is a torchvision ResNet key (it has {sorted(state)[:3]}, expected "
                      f"conv1.weight, bn1.weight, layer1.0.conv1.weight, ...)")
        else:
            detail = "; ".join(filter(None, [f"shape mismatch: {', '.join(wrong[:3])}" if wrong else "",
                                             f"missing {missing[:3]}" if missing else "",
                                             f"unexpected {unexpected[:3]}" if unexpected else ""]))
        fix = hint or "build the model with the settings the weights were trained with"
        raise WeightsError(f"pretrained weights {path} do not fit the {backbone.arch} backbone with the "
                           f"{backbone.stem_kind} stem: {fix} ({detail})")
    new = dict(expected)
    for tv, ours in by_tv.items():
        if tv in state:
            new[ours] = state[tv]
    backbone.load_state_dict(new)

