"""FIRM: Focused In-distribution Representation Modeling for anomaly detection.

Train an encoder on normal images only, with synthetic outliers in every batch and a contrastive
loss in which all inliers are positives of each other; score new images by their similarity to
the normal training features.
"""
from .config import PRESETS, EvalConfig, ModelConfig, Settings, TrainConfig, preset

__version__ = "0.2.0"
__all__ = ["FIRMDetector", "FIRMLoss", "NTXentLoss", "SupConLoss", "Encoder", "ModelConfig", "TrainConfig", "EvalConfig",
           "Settings", "PRESETS", "preset", "Trainer", "__version__"]

# Names whose modules import torch are loaded on first use, so that ``firm --help`` and
# ``firm --version`` answer without it.
_LAZY = {"FIRMDetector": "detector", "FIRMLoss": "losses", "NTXentLoss": "losses", "SupConLoss": "losses",
         "Encoder": "models", "Trainer": "training"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
