"""Metrics and the evaluation protocol: AUROC per scorer, learning-curve summaries (AULC,
epochs to reach a target, speed-up factors)."""
from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from .config import EvalConfig
from .features import TTA_MODES, FeatureSet, extract_features
from .models import Encoder
from .scoring import score, scorer_names

__all__ = ["auroc", "evaluate_scorers", "aulc", "epochs_to_reach"]


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
                     scorers: list[str] = ("cos1",), tta: str | list[str] = "none", progress: bool = False,
                     config: EvalConfig | None = None, *, batch_size: int = 256
                     ) -> tuple[list[dict], dict[tuple[str, str], Tensor]]:
    """AUROC of every scorer for every test-time ensemble on one test set.

    ``bank`` is the normal training images (uint8) or their features already extracted at the
    four rotations (as a saved detector holds them; they must have been extracted with the same
    ``config.center_crop``). ``scorers`` may hold ``"all"`` (every registered scorer); ``config``
    (default ``EvalConfig()``) sets the test-time zoom, the crop ensemble and the SVMs' nu.
    Returns the records ``{"scorer", "tta", "auroc"}`` and the scores by ``(scorer, tta)``.
    Features are extracted once per ensemble and shared by all scorers.
    """
    config = config or EvalConfig()
    names = scorer_names(scorers)
    modes = [tta] if isinstance(tta, str) else list(tta)
    TTA_MODES.check(modes)  # unknown names fail before any image goes through the model
    records, all_scores = [], {}
    for mode in modes:
        turns = TTA_MODES[mode].quarter_turns
        if isinstance(bank, FeatureSet):
            if bank.rotations == len(turns):
                bank_set = bank
            elif bank.rotations == 4:
                bank_set = FeatureSet(bank.features[list(turns)])
            else:
                raise ValueError(f"test-time ensemble {mode!r} needs a bank at {len(turns)} or 4 rotations; "
                                 f"this one has {bank.rotations}")
        else:
            bank_set = extract_features(model, bank, mode, query=False, batch_size=batch_size, progress=progress,
                                        config=config)
        queries = extract_features(model, test_images, mode, query=True, batch_size=batch_size, progress=progress,
                                   config=config)
        for name in names:
            s = score(name, bank_set, queries, config)
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
