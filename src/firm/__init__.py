"""FIRM: Focused In-distribution Representation Modeling for anomaly detection.

Train an encoder on normal images only, with synthetic outliers in every batch and a contrastive
loss in which all inliers are positives of each other; score new images by their similarity to
the normal training features.
"""
from .losses import FIRMLoss, NTXentLoss, SupConLoss
from .models import Encoder, ModelConfig
from .training import TrainConfig, Trainer

__version__ = "0.1.0"
__all__ = ["FIRMLoss", "NTXentLoss", "SupConLoss", "Encoder", "ModelConfig", "TrainConfig", "Trainer", "__version__"]
