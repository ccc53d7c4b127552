"""A detector for your own images, in the scikit-learn / PyOD style.

    det = FIRMDetector(epochs=30).fit("normal_images/")      # folder, paths, array or tensor
    det.decision_function(["new1.png", "new2.jpg"])          # higher = more anomalous
    det.predict(new_images)                                   # 1 = anomaly, 0 = normal
    det.save("model/"); FIRMDetector.load("model/")

``fit`` holds out a fraction of the normal images, trains the encoder on the rest, keeps their
backbone features as the bank, and sets ``threshold_`` so that a ``target_fpr`` share of the
held-out normal images would be flagged (or a ``contamination`` share, when given).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator
from torch import Tensor

from .data import ImageSet, as_images, load_image_folder
from .features import TTA_MODES, FeatureSet, extract_features
from .models import Encoder, ModelConfig
from .scoring import SCORERS, apply_scorers, fit_scorers
from .serialization import ModelFileError, atomic_write, load_model_dir, save_model_dir
from .training import LOG, TrainConfig, Trainer

__all__ = ["FIRMDetector", "read_images", "score_to_csv"]


def read_images(X, size: int = 32, channels: int = 3, name: str = "images") -> tuple[Tensor, list[str]]:
    """uint8 images ``(N, channels, size, size)`` and their paths (empty for arrays) from a
    folder, an image file, a list of those, an :class:`ImageSet`, or an array / tensor."""
    if isinstance(X, ImageSet):
        return as_images(X.images, size, channels, name), list(X.paths)
    if isinstance(X, (str, os.PathLike)) or (isinstance(X, (list, tuple)) and X and isinstance(X[0], (str, os.PathLike))):
        found = load_image_folder(X, size, channels, name=name)
        return found.images, found.paths
    return as_images(X, size, channels, name), []


class FIRMDetector(BaseEstimator):
    """FIRM anomaly detector: ``fit`` on normal images, then score new ones.

    Parameters are those of the encoder (``width``, ``head_hidden``, ``head_layers``,
    ``image_size``), of training (``loss``, ``epochs``, ``batch_size``, ``lr``, ``shifts``,
    ``id_share``, ``seed``, ``device``), of scoring (``scorer``, ``tta``) and of the threshold
    (``target_fpr`` on a ``holdout`` share of the normal images, or ``contamination``). The
    defaults train a small network that runs on a CPU in minutes; the paper's setting is
    ``width=64, head_hidden=1024, head_layers=7, batch_size=32, lr=0.01, epochs=2000``.

    Fitted attributes: ``encoder_``, ``bank_`` (training features, 4 rotations), ``threshold_``,
    ``holdout_scores_``, ``history_`` (per-epoch training log), ``train_paths_``.
    """

    def __init__(self, loss: str = "firm", epochs: int = 30, batch_size: int = 64, lr: float = 0.02,
                 width: int = 16, head_hidden: int = 512, head_layers: int = 2, image_size: int = 32,
                 shifts: str = "rotation", id_share: float | None = None, scorer: str = "cos1", tta: str = "none",
                 target_fpr: float = 0.05, contamination: float | None = None, holdout: float = 0.1,
                 seed: int = 0, device: str = "auto", progress: bool = True):
        self.loss, self.epochs, self.batch_size, self.lr = loss, epochs, batch_size, lr
        self.width, self.head_hidden, self.head_layers, self.image_size = width, head_hidden, head_layers, image_size
        self.shifts, self.id_share, self.scorer, self.tta = shifts, id_share, scorer, tta
        self.target_fpr, self.contamination, self.holdout = target_fpr, contamination, holdout
        self.seed, self.device, self.progress = seed, device, progress

    # ------------------------------------------------------------------ fitting
    def _check_params(self) -> None:
        if self.scorer not in SCORERS:
            raise ValueError(f"unknown scorer {self.scorer!r}; choose from {', '.join(SCORERS)}")
        if self.tta not in TTA_MODES:
            raise ValueError(f"unknown tta {self.tta!r}; choose from {', '.join(TTA_MODES)}")
        rate = self.contamination if self.contamination is not None else self.target_fpr
        if not 0 < rate < 1:
            raise ValueError(f"target_fpr / contamination must be in (0, 1), got {rate}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")

    def train_config(self) -> TrainConfig:
        return TrainConfig(loss=self.loss, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           shifts=self.shifts, id_share=self.id_share, seed=self.seed, device=self.device,
                           channels_last=True, checkpoint_every=0)

    def fit(self, X, y=None, outliers=None) -> "FIRMDetector":
        """Train on normal images ``X``; ``outliers`` (optional) are real auxiliary images used
        instead of synthetic outliers (Outlier Exposure). ``y`` is ignored."""
        self._check_params()
        images, paths = read_images(X, self.image_size, name="normal images")
        gen = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(images), generator=gen)
        n_hold = int(round(self.holdout * len(images)))
        if n_hold and len(images) - n_hold < 2:
            raise ValueError(f"only {len(images)} normal images: too few to hold out {self.holdout:.0%} for the threshold")
        if 0 < n_hold < 20:
            warnings.warn(f"the threshold rests on only {n_hold} held-out normal images; it will be coarse", stacklevel=2)
        train_idx, hold_idx = order[n_hold:], order[:n_hold]
        aux = read_images(outliers, self.image_size, name="outlier images")[0] if outliers is not None else None
        torch.manual_seed(self.seed)
        model = Encoder(ModelConfig(width=self.width, head_hidden=self.head_hidden, head_layers=self.head_layers,
                                    image_size=self.image_size))
        trainer = Trainer(model, self.train_config(), images[train_idx], auxiliary=aux, progress=self.progress)
        trainer.train()
        self.history_ = trainer.history
        self.train_paths_ = [paths[i] for i in train_idx.tolist()] if paths else []
        self._fit_scoring(model, images[train_idx])  # features on the training device
        if n_hold:
            self.holdout_scores_ = self.decision_function(images[hold_idx])
            self.set_threshold_from(self.holdout_scores_)
        else:
            self.holdout_scores_, self.threshold_ = np.zeros(0), None
        return self

    @classmethod
    def from_encoder(cls, encoder: Encoder, bank_images: Tensor, **params) -> "FIRMDetector":
        """A detector around an already trained encoder, its bank built from ``bank_images``
        (no threshold until :meth:`set_threshold_from` or :meth:`set_threshold`)."""
        det = cls(image_size=encoder.config.image_size, width=encoder.config.width,
                  head_hidden=encoder.config.head_hidden, head_layers=encoder.config.head_layers, **params)
        det._check_params()
        det.history_, det.train_paths_, det.holdout_scores_, det.threshold_ = [], [], np.zeros(0), None
        det._fit_scoring(encoder, bank_images)
        return det

    def _fit_scoring(self, encoder: Encoder, bank_images: Tensor) -> None:
        self.encoder_ = encoder.eval()
        self.bank_ = extract_features(encoder, bank_images, "angled", query=False, progress=self.progress)
        self._fit_scorers()

    def _fit_scorers(self) -> None:
        bank = self.bank_ if self.tta != "none" else FeatureSet(self.bank_.features[:1])
        self.scorers_ = fit_scorers(self.scorer, bank)

    def set_threshold_from(self, normal_scores: np.ndarray) -> float:
        """Threshold at the (1 - rate) quantile of scores of normal images (rate = contamination
        if set, else target_fpr): about that share of normal images will be flagged."""
        rate = self.contamination if self.contamination is not None else self.target_fpr
        self.threshold_ = float(np.quantile(np.asarray(normal_scores, dtype=np.float64), 1 - rate, method="higher"))
        return self.threshold_

    def set_threshold(self, threshold: float) -> None:
        self.threshold_ = float(threshold)

    # ------------------------------------------------------------------ scoring
    def _check_fitted(self) -> None:
        if not hasattr(self, "encoder_"):
            raise RuntimeError("this FIRMDetector is not fitted yet: call fit(normal_images) or FIRMDetector.load(folder)")

    def decision_function(self, X) -> np.ndarray:
        """Anomaly score of each image (higher = more anomalous)."""
        self._check_fitted()
        images, _ = read_images(X, self.image_size, name="images to score")
        queries = extract_features(self.encoder_, images, self.tta, query=True, seed=self.seed, progress=self.progress)
        return apply_scorers(self.scorers_, queries).numpy().astype(np.float64)

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
    def save(self, directory: str | os.PathLike, extra: dict | None = None) -> Path:
        """Weights (safetensors), feature bank (safetensors) and settings (JSON) in ``directory``."""
        self._check_fitted()
        params = {k: v for k, v in self.get_params().items() if k != "progress"}
        config = {**(extra or {}), "detector": {**params, "threshold": self.threshold_,
                                                "holdout_scores": np.asarray(self.holdout_scores_).tolist(),
                                                "train_paths": self.train_paths_}}
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.history_ and not (directory / LOG).exists():
            atomic_write(directory / LOG, "".join(json.dumps(r) + "\n" for r in self.history_))
        return save_model_dir(directory, self.encoder_, config, self.bank_.features)

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str = "cpu", progress: bool = False) -> "FIRMDetector":
        """A fitted detector from a folder written by :meth:`save` (or by ``firm train``)."""
        encoder, config, bank = load_model_dir(directory, device)
        if bank is None:
            raise ModelFileError(f"{directory} holds no feature bank; it was not saved by a fitted detector")
        saved = dict(config.get("detector", {}))
        state = {k: saved.pop(k) for k in ("threshold", "holdout_scores", "train_paths") if k in saved}
        valid = set(cls().get_params())
        det = cls(**{k: v for k, v in saved.items() if k in valid}, progress=progress)
        det.device = str(device)
        det._check_params()
        det.encoder_, det.bank_ = encoder, FeatureSet(bank)
        det.threshold_ = state.get("threshold")
        det.holdout_scores_ = np.asarray(state.get("holdout_scores", []), dtype=np.float64)
        det.train_paths_ = state.get("train_paths", [])
        log = Path(directory) / LOG
        det.history_ = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
        det._fit_scorers()
        return det


def score_to_csv(model_dir: str | os.PathLike, inputs, out: str | os.PathLike, threshold: float | None = None,
                 progress: bool = True) -> list[dict]:
    """Score image files or folders with a saved detector; write a CSV ranked by anomaly score
    (``rank, path, score, is_anomaly``) and return its rows."""
    import csv
    import io
    det = FIRMDetector.load(model_dir, progress=progress)
    if threshold is not None:
        det.set_threshold(threshold)
    found = load_image_folder(inputs, det.image_size, name="images to score")
    scores = det.decision_function(found.images)
    flags = scores > det.threshold_ if det.threshold_ is not None else np.zeros(len(scores), dtype=bool)
    order = np.argsort(-scores, kind="stable")
    rows = [{"rank": r + 1, "path": found.paths[i], "score": float(scores[i]), "is_anomaly": int(flags[i])}
            for r, i in enumerate(order)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["rank", "path", "score", "is_anomaly"])
    writer.writeheader()
    writer.writerows({**r, "score": f"{r['score']:.6g}"} for r in rows)
    atomic_write(out, buf.getvalue())
    return rows
