"""Metrics and the evaluation protocol: AUROC per scorer, learning-curve summaries (AULC,
epochs to reach a target, speed-up factors)."""
from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from .features import FeatureSet, extract_features
from .models import Encoder
from .scoring import score

__all__ = ["auroc", "evaluate_scorers", "aulc", "epochs_to_reach", "speedup"]


def auroc(scores: Tensor | np.ndarray, is_anomaly: Tensor | np.ndarray) -> float:
    """Area under the ROC curve of anomaly scores (higher = more anomalous) for 0/1 labels."""
    from sklearn.metrics import roc_auc_score
    y = np.asarray(is_anomaly)
    if y.min() == y.max():
        raise ValueError("AUROC needs both normal and anomalous examples; the labels hold only one kind")
    s = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values; the model or its features are broken")
    return float(roc_auc_score(y, s))


def evaluate_scorers(model: Encoder, bank: Tensor | FeatureSet, test_images: Tensor, is_anomaly: Tensor,
                     scorers: list[str] = ("cos1",), tta: str | list[str] = "none", batch_size: int = 256,
                     progress: bool = False) -> tuple[list[dict], dict[tuple[str, str], Tensor]]:
    """AUROC of every scorer for every test-time ensemble on one test set.

    ``bank`` is the normal training images (uint8) or their features already extracted at the
    four rotations (as a saved detector holds them). Returns the records
    ``{"scorer", "tta", "auroc"}`` and the scores by ``(scorer, tta)``. Features are extracted
    once per ensemble and shared by all scorers.
    """
    records, all_scores = [], {}
    for mode in [tta] if isinstance(tta, str) else tta:
        if isinstance(bank, FeatureSet):
            bank_set = bank if mode != "none" else FeatureSet(bank.features[:1])
            if bank_set.rotations != (1 if mode == "none" else 4):
                raise ValueError(f"test-time ensemble {mode!r} needs a bank at 4 rotations; this one has {bank.rotations}")
        else:
            bank_set = extract_features(model, bank, mode, query=False, batch_size=batch_size, progress=progress)
        queries = extract_features(model, test_images, mode, query=True, batch_size=batch_size, progress=progress)
        for name in scorers:
            s = score(name, bank_set, queries)
            all_scores[(name, mode)] = s
            records.append({"scorer": name, "tta": mode, "auroc": auroc(s, is_anomaly)})
    return records, all_scores


def aulc(epochs: list[float], values: list[float]) -> float:
    """Area under a learning curve, x rescaled to [0, 1], by Simpson's rule (trapezoid for 2 points)."""
    from scipy.integrate import simpson
    x = np.asarray(epochs, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("a learning curve needs at least two (epoch, value) points of equal count")
    if np.any(np.diff(x) <= 0):
        raise ValueError("learning-curve epochs must be strictly increasing")
    x = (x - x[0]) / (x[-1] - x[0])
    return float(simpson(y, x=x)) if len(x) > 2 else float(np.trapezoid(y, x))


def epochs_to_reach(epochs: list[float], values: list[float], target: float) -> float:
    """First epoch at which the curve reaches ``target`` (linear interpolation between
    evaluations), or ``inf`` if it never does."""
    prev_e, prev_v = None, None
    for e, v in zip(epochs, values):
        if v >= target:
            if prev_e is None or v == prev_v:
                return float(e)
            return float(prev_e + (target - prev_v) / (v - prev_v) * (e - prev_e))
        prev_e, prev_v = e, v
    return math.inf


def speedup(baseline_epochs: float, method_epochs: float) -> float:
    """How many times fewer epochs the method needs than the baseline (``inf`` / ``nan`` when
    one of them never reaches the target)."""
    if math.isinf(method_epochs):
        return math.nan
    if method_epochs <= 0:
        return math.inf
    return baseline_epochs / method_epochs
