"""A detector for your own images, in the scikit-learn / PyOD style.

    det = FIRMDetector.from_preset("detector").fit("normal_images/")  # a folder, paths or an array
    det.decision_function(["new1.png", "new2.jpg"])          # higher = more anomalous; 1.0 = the threshold
    det.predict(new_images)                                   # 1 = anomaly, 0 = normal
    det.anomaly_maps(new_images)                              # (N, H, W) heat maps on the same scale
    det.save("model/"); FIRMDetector.load("model/")

The detector takes one of three paths (:data:`firm.config.METHODS`), the first or the last chosen
from the images unless set:

* ``patch`` (when the ImageNet weights of EfficientNet-Lite0 are installed, the ``pretrained``
  extra): no training; patch features of the pretrained network fill a greedy coreset memory
  (:class:`~firm.maps.PatchBank`), and an image's score is PatchCore's re-weighted distance of its
  most unusual patch. Images keep their median aspect ratio; small ones are upsampled.
* ``finetune`` (only when asked for): the same network is first fine-tuned with the loss and its
  synthetic outliers on the normal images (``finetune_epochs``, ``finetune_lr``,
  ``finetune_batch_size``; stem, first two stages and BatchNorm statistics frozen), then scored
  as ``patch``.
* ``firm`` (without the weights, or with an image size set): an encoder trained with FIRM on the normal
  images; images are scored by a scorer on pooled features (or, for large images, by the patch
  bank on the trained encoder).

``fit`` holds out a share of the normal images and puts scores on a scale learnt from them:
0 is the median held-out normal image and 1.0 the threshold, at which a ``target_fpr`` share of
them (or a ``contamination`` share) would be flagged. Anomaly maps use the same scale.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator
from torch import Tensor

from .config import AUTO, FINETUNE, FIRM, PATCH, POOLED, DataConfig, ModelConfig, Settings, apply_overrides, preset
from .data import image_sides, input_shape, is_paths, read_images
from .efficientnet import WeightsMissing, packaged_weights
from .features import FeatureSet, extract_features
from .losses import LOSSES
from .maps import PatchBank
from .models import PACKAGED, Encoder, resolve_stem
from .rundir import LOG, PATCHES, load_extra, load_model_dir, read_log, save_model_dir, train_files
from .runner import feature_check, shifted_copies, train_encoder, validate
from .scoring import apply_scorers, fit_scorers
from .serialization import ModelFileError, atomic_write

__all__ = ["FIRMDetector", "FOLDER_PREFIX", "choose_method", "pretrained_model", "MIN_NORMAL_IMAGES",
           "MIN_HOLDOUT"]

MIN_NORMAL_IMAGES = 10
"""Fewer normal images than this are refused by ``fit``: the feature bank and the scorers fitted
on it need a few images to say what normal looks like."""
MIN_HOLDOUT = 20
"""Below this many held-out normal images ``fit`` warns that the threshold (a quantile of their
scores) is coarse."""

FOLDER_PREFIX = "folder:"
"""``settings.data.dataset`` of a detector fitted on image files or arrays: ``folder:`` and the
images' common folder (``folder:array`` for arrays)."""

_PATCH_BACKBONE = "efficientnet_lite0"


def choose_method(settings: Settings, sides: list[tuple[int, int]]) -> tuple[str, bool, str]:
    """``(method, large, note)`` for normal images of ``sides`` ``(height, width)``: ``large`` when
    their median shorter side reaches ``large_image_size``; method ``auto`` becomes ``patch`` if the
    pretrained weights are installed (large images at ``pretrained_size``, smaller ones upsampled to
    ``small_pretrained_size``), else ``firm``, and ``firm`` when an image size is set (then
    ``large_image_size`` is 0); ``note`` says why."""
    d = settings.detector
    side = int(np.median([min(s) for s in sides])) if sides else 0
    large = bool(d.large_image_size) and side >= d.large_image_size
    if d.method != AUTO:
        return d.method, large, f"method {d.method} (set); images of {side} px (median shorter side)"
    if not d.large_image_size:
        return FIRM, False, f"image size {settings.model.image_size} px set: FIRM trained from scratch at that size"
    try:
        packaged_weights()
    except WeightsMissing as e:
        return FIRM, large, (f"images of {side} px: the pretrained patch detector would fit them better, but {e}; "
                             "falling back to FIRM trained from scratch")
    size = d.pretrained_size if large else d.small_pretrained_size
    return PATCH, large, (f"images of {side} px (median shorter side): pretrained patch detector at {size} px, "
                          "no training")


def pretrained_model(settings: Settings, sides: list[tuple[int, int]], large: bool = True,
                     finetune: bool = False) -> ModelConfig:
    """The model settings of the patch path: EfficientNet-Lite0 with its packaged ImageNet
    weights, at ``pretrained_size`` on the shorter side (``small_pretrained_size`` for images that
    :func:`choose_method` found below ``large_image_size``: ``large`` false) and the images' median
    aspect ratio (clipped to ``max_aspect``).
    ``finetune``: as MSC fine-tunes, the stem, the first two stages and the BatchNorm statistics
    frozen and no projection head (the loss sees the pooled features)."""
    d = settings.detector
    aspect = float(np.median([w / h for h, w in sides])) if sides else 1.0
    aspect = min(max(aspect, 1 / d.max_aspect), d.max_aspect)
    if abs(np.log(aspect)) < np.log(1.25):
        aspect = 1.0  # near-square images are read square
    small = bool(d.large_image_size) and not large  # large_image_size 0: no size class, pretrained_size
    return ModelConfig(backbone=_PATCH_BACKBONE, weights=PACKAGED, init="pytorch", head_layers=0,
                       head_out=0 if finetune else 128, image_size=d.small_pretrained_size if small else d.pretrained_size,
                       aspect=round(aspect, 4), in_channels=3, frozen_stages=2 if finetune else 0, freeze_bn=finetune)


SQUEEZE_WARNING = 1.3
"""Images whose aspect ratio differs from the detector's input by more than this factor get a warning."""


def _warn_if_squeezed(sides: list[tuple[int, int]], shape: tuple[int, int], name: str) -> None:
    """One warning when images of ``sides`` are stretched far from their shape by resizing to ``shape``."""
    target = shape[1] / shape[0]
    far = [(h, w) for h, w in sides if max(w / h / target, target * h / w) > SQUEEZE_WARNING]
    if far:
        h, w = far[0]
        warnings.warn(f"{name}: {len(far)} of {len(sides)} image(s) are resized far from their shape (e.g. {w} x {h} "
                      f"px to {shape[1]} x {shape[0]}); the detector reads every image at one shape, the normal "
                      "images' median aspect ratio on the pretrained path, square on the firm path", stacklevel=3)


def _scale(normal_scores: np.ndarray, rate: float) -> tuple[float, float]:
    """``(center, unit)``: the median of normal scores and the distance from it to their
    ``(1 - rate)`` quantile, so that ``(score - center) / unit`` is 0 at the median and 1 at the
    threshold."""
    values = np.asarray(normal_scores, dtype=np.float64)
    center = float(np.median(values))
    unit = float(np.quantile(values, 1 - rate, method="higher")) - center
    if not unit > 0:  # every held-out score the same: any larger score is beyond the threshold
        unit = max(abs(center), 1.0) * 1e-6
    return center, unit


def _enough_for_threshold(s: Settings) -> int:
    """How many normal images give :data:`MIN_HOLDOUT` held out at the settings' hold-out share."""
    return math.ceil(MIN_HOLDOUT / s.detector.holdout) if s.detector.holdout else MIN_HOLDOUT


class FIRMDetector(BaseEstimator):
    """Anomaly detector: ``fit`` on normal images, then score new ones (see the module doc).

    Follows PyOD's convention: :meth:`decision_function` is higher for more anomalous images
    (:meth:`score_samples` is its negative, scikit-learn's convention). After a fit with a
    hold-out, scores are on the held-out normal images' scale: 0 = their median, 1.0 = the
    threshold (``threshold_`` is then 1.0).

    ``settings`` (a :class:`~firm.config.Settings`; default: the ``detector`` preset) holds the
    encoder, training, scoring and threshold settings; :meth:`from_preset` builds one from a preset
    and flat overrides, e.g. ``FIRMDetector.from_preset("detector", method="firm", epochs=30)``.

    Fitted attributes: ``settings_`` (the settings really used: method, image size and aspect,
    ``shifts auto`` resolved), ``method_`` and ``score_`` (the path and the image score taken),
    ``encoder_``, ``bank_`` (pooled training features, None on the patch path), ``patches_``
    (the :class:`~firm.maps.PatchBank`, None when ``patch_bank`` is 0), ``threshold_``,
    ``score_scale_`` and ``map_scale_`` (``(center, unit)`` of scores and maps, None without a
    hold-out), ``holdout_scores_`` (raw), ``history_`` (per-epoch log), ``train_paths_``, ``notes_``.
    """

    def __init__(self, settings: Settings | None = None, progress: bool = True):
        self.settings = settings
        self.progress = progress

    @classmethod
    def from_preset(cls, name: str = "detector", progress: bool = True, **overrides) -> "FIRMDetector":
        """A detector with preset ``name``'s settings and flat overrides (``epochs=30``, ...)."""
        return cls(apply_overrides(preset(name), overrides), progress=progress)

    # ------------------------------------------------------------------ fitting
    def _resolved(self) -> Settings:
        s = (self.settings or preset("detector")).copy()
        validate(dataclasses.replace(s, data=DataConfig()))  # the images come from fit(X), not from the data settings
        return s

    def fit(self, X, y=None, outliers=None, run_dir: str | os.PathLike | None = None,
            resume: bool = False) -> "FIRMDetector":
        """Fit on normal images ``X`` (a folder, image paths, or an array). On the trained paths,
        ``outliers`` (optional) are real auxiliary images used instead of synthetic outliers
        (Outlier Exposure), and with ``run_dir`` the training log and checkpoints go there
        (``resume=True`` continues a killed fit). ``y`` is ignored."""
        s = self._resolved()
        sides = image_sides(X, "normal images")
        method, large, note = choose_method(s, sides)
        notes = [note]
        self._log(note)
        if method in (PATCH, FINETUNE):
            s.model = pretrained_model(s, sides, large, finetune=method == FINETUNE)
            if outliers is not None and method == PATCH:
                raise ValueError("outlier images are used for training, and the patch detector trains nothing: "
                                 "pass --method firm to train with them")
        elif large:
            s.model.image_size = s.detector.large_image_size
            notes.append(f"trained at {s.model.image_size} px with the {resolve_stem(s.model)} stem")
            self._log(notes[-1])
        m = s.model
        shape = input_shape(m.image_size, m.aspect)
        _warn_if_squeezed(sides, shape, "normal images")
        images, paths = read_images(X, shape, m.in_channels, name="normal images")
        train_idx, hold_idx = self._split(s, len(images))
        self.method_ = method
        if method != FIRM:  # the pretrained paths keep no pooled bank: their score is the patch memory's
            self.score_, self.bank_ = PATCH, None
        else:
            self.score_ = s.detector.score if s.detector.score != AUTO else (PATCH if large else POOLED)
        if self.score_ == PATCH and s.detector.patch_bank == 0:
            raise ValueError("score patch needs a patch bank: set patch_bank > 0 (e.g. --patch-bank 4096)")
        train = images[train_idx]
        if method == FINETUNE:
            s.train = dataclasses.replace(s.train, epochs=s.detector.finetune_epochs, lr=s.detector.finetune_lr,
                                          batch_size=s.detector.finetune_batch_size)
        if method == PATCH:
            encoder, self.history_ = Encoder(m).eval(), []
        else:
            aux = read_images(outliers, shape, m.in_channels, name="outlier images")[0] if outliers is not None else None
            trained = train_encoder(s, train, auxiliary=aux, files=train_files(run_dir) if run_dir is not None else None,
                                    resume=resume, progress=self.progress, log=self._log)
            s.train, encoder, self.history_ = trained.train, trained.encoder, trained.history
            notes += trained.notes
            if s.model.weights and LOSSES[s.train.loss].trains and len(hold_idx):
                held = images[hold_idx]  # against its shifted copies: the fine-tuned vs pretrained check
                y = torch.cat([torch.zeros(len(held), dtype=torch.long), torch.ones(len(held), dtype=torch.long)])
                notes.append(feature_check(s, encoder, train, torch.cat([held, shifted_copies(held, s.train.shifts,
                                                                                              s.train.seed)]),
                                           y, log=self._log)["note"])
        # Fitted on images given here, not on a dataset's split: recorded so that nothing (firm
        # evaluate, the report) takes the preset's dataset for the data the detector learned.
        source = os.path.commonpath([os.path.abspath(p) for p in paths]) if paths else "array"
        s.data = dataclasses.replace(s.data, dataset=f"{FOLDER_PREFIX}{source}", normal_class="0", train_images=None)
        s.detector.method, s.detector.score = method, self.score_
        self.settings_, self.notes_ = s, notes
        self.train_paths_ = [str(Path(paths[i]).resolve()) for i in train_idx.tolist()] if paths else []
        self.encoder_ = encoder.eval()
        if method == FIRM:
            self._fit_pooled(train)
        d = s.detector
        self.patches_ = (PatchBank(self.encoder_, stages=d.patch_stages, coreset=1.0, max_bank=d.patch_bank,
                                   projection_dim=d.coreset_dims, max_grid=32 if method == FIRM else 1000,
                                   seed=s.train.seed, progress=self.progress).fit(train)
                         if d.patch_bank > 0 else None)
        self.score_scale_ = self.map_scale_ = None
        self.threshold_ = None
        self.holdout_scores_ = np.zeros(0)
        if len(hold_idx):
            held = images[hold_idx]
            if self.patches_ is not None:
                maps, patch_scores = self.patches_.score(held)
                self.map_scale_ = _scale(maps.flatten(1).amax(1).numpy(), self._rate())
            raw = patch_scores.numpy().astype(np.float64) if self.score_ == PATCH else self._raw_scores(held)
            self.holdout_scores_ = raw
            self.set_threshold_from(raw)
        return self

    def _split(self, s: Settings, n: int) -> tuple[Tensor, Tensor]:
        """Seeded indices of the training and the held-out normal images."""
        if n < MIN_NORMAL_IMAGES:
            raise ValueError(f"only {n} normal image(s): a detector needs at least {MIN_NORMAL_IMAGES}, and about "
                             f"{_enough_for_threshold(s)} for a threshold from the {s.detector.holdout:.0%} held out")
        gen = torch.Generator().manual_seed(s.train.seed)
        order = torch.randperm(n, generator=gen)
        n_hold = int(round(s.detector.holdout * n))
        if n_hold and n - n_hold < 2:
            raise ValueError(f"only {n} normal images: too few to hold out {s.detector.holdout:.0%} for the threshold")
        if s.detector.holdout and n_hold < MIN_HOLDOUT:
            warnings.warn(f"the threshold rests on {n_hold} held-out normal image(s) ({s.detector.holdout:.0%} of {n}); "
                          f"it is coarse below {MIN_HOLDOUT}, that is below {_enough_for_threshold(s)} normal images"
                          + ("; with none, the detector has no threshold" if not n_hold else ""), stacklevel=3)
        return order[n_hold:], order[:n_hold]

    def _log(self, message: str) -> None:
        if self.progress:
            print(message)

    @classmethod
    def from_encoder(cls, encoder: Encoder, bank_images: Tensor, settings: Settings, history: list[dict] = (),
                     progress: bool = True) -> "FIRMDetector":
        """A detector around an already trained encoder, its bank built from ``bank_images``
        (raw scores and no threshold until :meth:`set_threshold_from` or :meth:`set_threshold`)."""
        det = cls(settings, progress=progress)
        det.settings_ = det._resolved()
        det.settings_.detector.method, det.settings_.detector.score = FIRM, POOLED
        det.method_, det.score_ = FIRM, POOLED
        det.history_, det.notes_, det.train_paths_ = list(history), [], []
        det.patches_ = None
        det.holdout_scores_, det.threshold_ = np.zeros(0), None
        det.score_scale_ = det.map_scale_ = None
        det.encoder_ = encoder.eval()
        det._fit_pooled(bank_images)
        return det

    def _fit_pooled(self, bank_images: Tensor) -> None:
        self.bank_ = extract_features(self.encoder_, bank_images, "angled", query=False, progress=self.progress,
                                      config=self.settings_.eval)
        self._fit_scorers()

    def _fit_scorers(self) -> None:
        e = self.settings_.eval
        bank = self.bank_ if e.tta != "none" else FeatureSet(self.bank_.features[:1])
        self.scorers_ = fit_scorers(e.scorer, bank, config=e)

    def _rate(self) -> float:
        d = self.settings_.detector
        return d.contamination if d.contamination is not None else d.target_fpr

    def set_threshold_from(self, normal_scores: np.ndarray) -> float:
        """Learn the score scale from raw scores of normal images: 0 = their median, 1.0 = their
        (1 - rate) quantile (rate = contamination if set, else target_fpr), which becomes the
        threshold: about that share of normal images will be flagged."""
        self.score_scale_ = _scale(normal_scores, self._rate())
        self.threshold_ = 1.0
        return self.threshold_

    def set_threshold(self, threshold: float) -> None:
        """Flag images whose :meth:`decision_function` exceeds ``threshold``."""
        self.threshold_ = float(threshold)

    # ------------------------------------------------------------------ scoring
    def _check_fitted(self) -> None:
        if not hasattr(self, "encoder_"):
            raise RuntimeError("this FIRMDetector is not fitted yet: call fit(normal_images) or FIRMDetector.load(folder)")

    @property
    def image_size(self) -> int:
        """The shorter side images are resized to."""
        self._check_fitted()
        return self.settings_.model.image_size

    @property
    def input_shape(self) -> tuple[int, int]:
        """``(height, width)`` images are resized to."""
        self._check_fitted()
        return input_shape(self.settings_.model.image_size, self.settings_.model.aspect)

    def read(self, X, name: str = "images to score") -> tuple[Tensor, list[str]]:
        """Images as this detector's encoder takes them, and their paths."""
        self._check_fitted()
        if is_paths(X):
            _warn_if_squeezed(image_sides(X, name), self.input_shape, name)
        return read_images(X, self.input_shape, self.settings_.model.in_channels, name=name)

    def _raw_scores(self, images: Tensor) -> np.ndarray:
        if self.score_ == PATCH:
            return self.patches_.score(images, with_maps=False)[1].numpy().astype(np.float64)
        e = self.settings_.eval
        queries = extract_features(self.encoder_, images, e.tta, query=True, seed=self.settings_.train.seed,
                                   progress=self.progress, config=e)
        return apply_scorers(self.scorers_, queries).numpy().astype(np.float64)

    def raw_scores(self, X) -> np.ndarray:
        """Anomaly scores before the held-out scale (higher = more anomalous)."""
        return self._raw_scores(self.read(X)[0])

    def scaled(self, raw: np.ndarray) -> np.ndarray:
        """Raw image scores on the detector's scale (unchanged when it has none)."""
        if self.score_scale_ is None:
            return np.asarray(raw, dtype=np.float64)
        center, unit = self.score_scale_
        return (np.asarray(raw, dtype=np.float64) - center) / unit

    def decision_function(self, X) -> np.ndarray:
        """Anomaly score of each image (higher = more anomalous; 1.0 = the threshold learnt from
        held-out normal images, 0 = their median)."""
        return self.scaled(self.raw_scores(X))

    def check_maps(self) -> None:
        """Raise the error that says how to get anomaly maps when this detector has no patch bank."""
        self._check_fitted()
        if getattr(self, "patches_", None) is None:
            raise ValueError("this detector has no patch bank, so it cannot make anomaly maps (it was fitted with "
                             "patch_bank 0, or by firm train or an older firm): refit it with patch_bank > 0, "
                             "e.g. firm fit --patch-bank 4096")

    def maps_and_scores(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Anomaly maps ``(N, H, W)`` (scaled as :meth:`anomaly_maps`) and :meth:`decision_function`
        scores of images already read (:meth:`read`), in one pass when the score is the patch score."""
        self.check_maps()
        maps, patch_scores = self.patches_.score(images)
        raw = patch_scores.numpy().astype(np.float64) if self.score_ == PATCH else self._raw_scores(images)
        if self.map_scale_ is not None:
            center, unit = self.map_scale_
            maps = (maps - center) / unit
        return maps.numpy(), self.scaled(raw)

    def anomaly_maps(self, X) -> np.ndarray:
        """Anomaly maps ``(N, H, W)`` at the detector's input shape (float32, higher = more
        anomalous): patch distances on the scale of the held-out normal images' map maxima
        (0 = their median, 1.0 = their threshold quantile), so a normal image's map stays low."""
        return self.maps_and_scores(self.read(X)[0])[0]

    def score_samples(self, X) -> np.ndarray:
        """scikit-learn's convention: higher = more normal (minus :meth:`decision_function`)."""
        return -self.decision_function(X)

    def predict(self, X) -> np.ndarray:
        """1 for images scored above ``threshold_`` (anomalies), 0 otherwise."""
        self._check_fitted()
        if self.threshold_ is None:
            raise RuntimeError("no threshold: fit with holdout > 0, or call set_threshold(value)")
        return (self.decision_function(X) > self.threshold_).astype(np.int64)

    # ------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike) -> Path:
        """Weights, feature bank and patch bank (safetensors) and settings (JSON) in ``directory``."""
        self._check_fitted()
        state = {"threshold": self.threshold_, "holdout_scores": np.asarray(self.holdout_scores_).tolist(),
                 "score_scale": self.score_scale_, "map_scale": self.map_scale_,
                 "train_paths": self.train_paths_, "notes": self.notes_}
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.history_ and not (directory / LOG).exists():
            atomic_write(directory / LOG, "".join(json.dumps(r) + "\n" for r in self.history_))
        extra = {PATCHES: self.patches_.to_tensors()} if getattr(self, "patches_", None) is not None else None
        bank = self.bank_.features if self.bank_ is not None else None
        return save_model_dir(directory, self.encoder_, self.settings_, state, bank, extra)

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str = "cpu", progress: bool = False) -> "FIRMDetector":
        """A fitted detector from a folder written by :meth:`save` (or by ``firm train``)."""
        encoder, settings, state, bank = load_model_dir(directory, device)
        d = settings.detector
        method = d.method if d.method != AUTO else FIRM  # folders of older versions hold the firm path
        if bank is None and method == FIRM:
            raise ModelFileError(f"{directory} holds no feature bank; it was not saved by a fitted detector")
        settings.train.device = str(device)
        det = cls(settings, progress=progress)
        det.settings_, det.method_ = settings, method
        det.score_ = d.score if d.score != AUTO else POOLED
        det.encoder_, det.bank_ = encoder, None if bank is None else FeatureSet(bank)
        det.threshold_ = state.get("threshold")
        det.score_scale_ = _pair(state.get("score_scale"), directory)
        det.map_scale_ = _pair(state.get("map_scale"), directory)
        det.holdout_scores_ = np.asarray(state.get("holdout_scores", []), dtype=np.float64)
        det.train_paths_ = state.get("train_paths", [])
        det.notes_ = state.get("notes", [])
        det.history_ = read_log(directory)
        if det.bank_ is not None:
            det._fit_scorers()
        saved = load_extra(directory, PATCHES, "patch bank")
        try:
            det.patches_ = None if saved is None else PatchBank.from_tensors(encoder, *saved, str(Path(directory) / PATCHES))
        except ValueError as e:
            raise ModelFileError(str(e)) from e
        if det.score_ == PATCH and det.patches_ is None:
            raise ModelFileError(f"{directory} scores with its patch bank, but holds none; refit the detector")
        return det


def _pair(value, directory) -> tuple[float, float] | None:
    """A saved ``(center, unit)`` scale, checked."""
    if value is None:
        return None
    try:
        center, unit = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ModelFileError(f"{directory}: a score scale in its config is not two numbers ({value!r}); refit the "
                             "detector or restore the file") from None
    if not unit > 0:
        raise ModelFileError(f"{directory}: a score scale in its config has unit {unit} (must be > 0)")
    return center, unit
