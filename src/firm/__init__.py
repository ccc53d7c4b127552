"""FIRM: Focused In-distribution Representation Modeling for anomaly detection.

Train an encoder on normal images only, with synthetic outliers in every batch and a contrastive
loss in which all inliers are positives of each other; score new images by their similarity to
the normal training features.
"""
from .config import PRESETS, EvalConfig, ModelConfig, Settings, TrainConfig, preset
from .losses import FIRMLoss, NTXentLoss, SupConLoss
from .models import Encoder
from .training import Trainer

__version__ = "0.2.0"
__all__ = ["FIRMLoss", "NTXentLoss", "SupConLoss", "Encoder", "ModelConfig", "TrainConfig", "EvalConfig", "Settings",
           "PRESETS", "preset", "Trainer", "__version__"]
