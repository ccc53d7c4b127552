"""A detector for your own images, in the scikit-learn / PyOD style.

    det = FIRMDetector.from_preset("detector", epochs=30).fit("normal_images/")  # folder, paths, array
    det.decision_function(["new1.png", "new2.jpg"])          # higher = more anomalous
    det.predict(new_images)                                   # 1 = anomaly, 0 = normal
    det.anomaly_maps(new_images)                              # (N, H, W) heat maps, higher = more anomalous
    det.save("model/"); FIRMDetector.load("model/")

``fit`` holds out a fraction of the normal images, trains the encoder on the rest, keeps their
backbone features as the bank, and sets ``threshold_`` so that a ``target_fpr`` share of the
held-out normal images would be flagged (or a ``contamination`` share, when given). With
``patch_bank > 0`` it also keeps a :class:`~firm.maps.PatchBank` of training patches for anomaly maps.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator
from torch import Tensor

from .config import DataConfig, Settings, apply_overrides, preset
from .data import median_side, read_images
from .features import FeatureSet, extract_features
from .maps import PatchBank
from .models import Encoder, resolve_stem
from .rundir import LOG, PATCHES, load_extra, load_model_dir, read_log, save_model_dir, train_files
from .runner import train_encoder, validate
from .scoring import apply_scorers, fit_scorers
from .serialization import ModelFileError, atomic_write

__all__ = ["FIRMDetector", "FOLDER_PREFIX"]

FOLDER_PREFIX = "folder:"
"""``settings.data.dataset`` of a detector fitted on image files or arrays: ``folder:`` and the
images' common folder (``folder:array`` for arrays)."""


class FIRMDetector(BaseEstimator):
    """FIRM anomaly detector: ``fit`` on normal images, then score new ones.

    Follows PyOD's convention: :meth:`decision_function` is higher for more anomalous images
    (:meth:`score_samples` is its negative, scikit-learn's convention).

    ``settings`` (a :class:`~firm.config.Settings`; default: the ``detector`` preset) holds the
    encoder, training, scoring and threshold settings; :meth:`from_preset` builds one from a preset
    and flat overrides, e.g. ``FIRMDetector.from_preset("detector", epochs=30, image_size=128)``.
    ``fit`` holds out ``holdout`` of the normal images and sets ``threshold_`` so that a
    ``target_fpr`` share of them (or a ``contamination`` share) would be flagged. With
    ``large_image_size`` set (the ``detector`` preset: 128), normal images whose median shorter
    side reaches it train at that size (``stem auto``: the ImageNet stem), others at ``image_size``.

    Fitted attributes: ``settings_`` (the settings really used, ``shifts auto`` resolved),
    ``encoder_``, ``bank_`` (training features at 4 rotations), ``patches_`` (the
    :class:`~firm.maps.PatchBank` for :meth:`anomaly_maps`, None when ``patch_bank`` is 0),
    ``threshold_``, ``holdout_scores_``, ``history_`` (per-epoch log), ``train_paths_``, ``notes_``.
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
        rate = s.detector.contamination if s.detector.contamination is not None else s.detector.target_fpr
        if not 0 < rate < 1:
            raise ValueError(f"target_fpr / contamination must be in (0, 1), got {rate}")
        if not 0 <= s.detector.holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {s.detector.holdout}")
        if s.detector.patch_bank < 0:
            raise ValueError(f"patch_bank must be >= 0 (0 = no anomaly maps), got {s.detector.patch_bank}")
        return s

    def fit(self, X, y=None, outliers=None, run_dir: str | os.PathLike | None = None,
            resume: bool = False) -> "FIRMDetector":
        """Train on normal images ``X``; ``outliers`` (optional) are real auxiliary images used
        instead of synthetic outliers (Outlier Exposure). ``y`` is ignored. With ``run_dir`` the
        training log and checkpoints go there, and ``resume=True`` continues a killed fit."""
        s = self._resolved()
        m = s.model
        notes = []
        large = s.detector.large_image_size
        if large and (side := median_side(X, "normal images")) >= large:
            m.image_size = large
            notes.append(f"images of {side} px (median shorter side) >= large_image_size: trained at {large} px "
                         f"with the {resolve_stem(m)} stem")
            self._log(notes[-1])
        images, paths = read_images(X, m.image_size, m.in_channels, name="normal images")
        gen = torch.Generator().manual_seed(s.train.seed)
        order = torch.randperm(len(images), generator=gen)
        n_hold = int(round(s.detector.holdout * len(images)))
        if n_hold and len(images) - n_hold < 2:
            raise ValueError(f"only {len(images)} normal images: too few to hold out {s.detector.holdout:.0%} "
                             "for the threshold")
        if 0 < n_hold < 20:
            warnings.warn(f"the threshold rests on only {n_hold} held-out normal images; it will be coarse", stacklevel=2)
        train_idx, hold_idx = order[n_hold:], order[:n_hold]
        aux = read_images(outliers, m.image_size, m.in_channels, name="outlier images")[0] if outliers is not None else None
        files = train_files(run_dir) if run_dir is not None else None
        trained = train_encoder(s, images[train_idx], auxiliary=aux, files=files, resume=resume,
                                progress=self.progress, log=self._log)
        s.train = trained.train
        # Trained on images given here, not on a dataset's split: recorded so that nothing (firm
        # evaluate, the report) takes the preset's dataset for the data the detector learned.
        source = os.path.commonpath([os.path.abspath(p) for p in paths]) if paths else "array"
        s.data = dataclasses.replace(s.data, dataset=f"{FOLDER_PREFIX}{source}", normal_class="0", train_images=None)
        self.settings_, self.history_, self.notes_ = s, trained.history, notes + trained.notes
        self.train_paths_ = [str(Path(paths[i]).resolve()) for i in train_idx.tolist()] if paths else []
        self._fit_scoring(trained.encoder, images[train_idx])  # features on the training device
        self.patches_ = (PatchBank(self.encoder_, max_bank=s.detector.patch_bank, seed=s.train.seed).fit(images[train_idx])
                         if s.detector.patch_bank > 0 else None)
        if n_hold:
            self.holdout_scores_ = self.decision_function(images[hold_idx])
            self.set_threshold_from(self.holdout_scores_)
        else:
            self.holdout_scores_, self.threshold_ = np.zeros(0), None
        return self

    def _log(self, message: str) -> None:
        if self.progress:
            print(message)

    @classmethod
    def from_encoder(cls, encoder: Encoder, bank_images: Tensor, settings: Settings, history: list[dict] = (),
                     progress: bool = True) -> "FIRMDetector":
        """A detector around an already trained encoder, its bank built from ``bank_images``
        (no threshold until :meth:`set_threshold_from` or :meth:`set_threshold`)."""
        det = cls(settings, progress=progress)
        det.settings_ = det._resolved()
        det.history_, det.notes_, det.train_paths_ = list(history), [], []
        det.patches_ = None
        det.holdout_scores_, det.threshold_ = np.zeros(0), None
        det._fit_scoring(encoder, bank_images)
        return det

    def _fit_scoring(self, encoder: Encoder, bank_images: Tensor) -> None:
        self.encoder_ = encoder.eval()
        self.bank_ = extract_features(encoder, bank_images, "angled", query=False, progress=self.progress,
                                      config=self.settings_.eval)
        self._fit_scorers()

    def _fit_scorers(self) -> None:
        e = self.settings_.eval
        bank = self.bank_ if e.tta != "none" else FeatureSet(self.bank_.features[:1])
        self.scorers_ = fit_scorers(e.scorer, bank, config=e)

    def set_threshold_from(self, normal_scores: np.ndarray) -> float:
        """Threshold at the (1 - rate) quantile of scores of normal images (rate = contamination
        if set, else target_fpr): about that share of normal images will be flagged."""
        d = self.settings_.detector
        rate = d.contamination if d.contamination is not None else d.target_fpr
        self.threshold_ = float(np.quantile(np.asarray(normal_scores, dtype=np.float64), 1 - rate, method="higher"))
        return self.threshold_

    def set_threshold(self, threshold: float) -> None:
        self.threshold_ = float(threshold)

    # ------------------------------------------------------------------ scoring
    def _check_fitted(self) -> None:
        if not hasattr(self, "encoder_"):
            raise RuntimeError("this FIRMDetector is not fitted yet: call fit(normal_images) or FIRMDetector.load(folder)")

    @property
    def image_size(self) -> int:
        self._check_fitted()
        return self.settings_.model.image_size

    def read(self, X, name: str = "images to score") -> tuple[Tensor, list[str]]:
        """Images as this detector's encoder takes them, and their paths."""
        self._check_fitted()
        return read_images(X, self.image_size, self.settings_.model.in_channels, name=name)

    def decision_function(self, X) -> np.ndarray:
        """Anomaly score of each image (higher = more anomalous)."""
        images, _ = self.read(X)
        e = self.settings_.eval
        queries = extract_features(self.encoder_, images, e.tta, query=True, seed=self.settings_.train.seed,
                                   progress=self.progress, config=e)
        return apply_scorers(self.scorers_, queries).numpy().astype(np.float64)

    def check_maps(self) -> None:
        """Raise the error that says how to get anomaly maps when this detector has no patch bank."""
        self._check_fitted()
        if getattr(self, "patches_", None) is None:
            raise ValueError("this detector has no patch bank, so it cannot make anomaly maps (it was fitted with "
                             "patch_bank 0, or by firm train or an older firm): refit it with patch_bank > 0, "
                             "e.g. firm fit --patch-bank 4096")

    def anomaly_maps(self, X) -> np.ndarray:
        """Anomaly maps ``(N, H, W)`` at the detector's image size (float32, higher = more
        anomalous; each map's maximum is an image score): see :mod:`firm.maps`."""
        self.check_maps()
        images, _ = self.read(X)
        return self.patches_.anomaly_maps(images).numpy()

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
                 "train_paths": self.train_paths_, "notes": self.notes_}
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.history_ and not (directory / LOG).exists():
            atomic_write(directory / LOG, "".join(json.dumps(r) + "\n" for r in self.history_))
        extra = {PATCHES: self.patches_.to_tensors()} if getattr(self, "patches_", None) is not None else None
        return save_model_dir(directory, self.encoder_, self.settings_, state, self.bank_.features, extra)

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str = "cpu", progress: bool = False) -> "FIRMDetector":
        """A fitted detector from a folder written by :meth:`save` (or by ``firm train``)."""
        encoder, settings, state, bank = load_model_dir(directory, device)
        if bank is None:
            raise ModelFileError(f"{directory} holds no feature bank; it was not saved by a fitted detector")
        settings.train.device = str(device)
        det = cls(settings, progress=progress)
        det.settings_ = settings
        det.encoder_, det.bank_ = encoder, FeatureSet(bank)
        det.threshold_ = state.get("threshold")
        det.holdout_scores_ = np.asarray(state.get("holdout_scores", []), dtype=np.float64)
        det.train_paths_ = state.get("train_paths", [])
        det.notes_ = state.get("notes", [])
        det.history_ = read_log(directory)
        det._fit_scorers()
        saved = load_extra(directory, PATCHES, "patch bank")
        try:
            det.patches_ = None if saved is None else PatchBank.from_tensors(encoder, *saved, str(Path(directory) / PATCHES))
        except ValueError as e:
            raise ModelFileError(str(e)) from e
        return det
