"""Knowledge distillation: pure losses, the ``DistillationLoss`` wrapper and feature matching.

>>> from compress_callbacks.distillation import DistillationLoss, FeatureDistillation, soft_kd_loss
>>> DistillationLoss(None, temperature=2.0, alpha=0.5).alpha
0.5
"""

from .features import FeatureDistillation
from .loss import DistillationLoss
from .losses import cosine_feature_loss, mse_feature_loss, soft_kd_loss, token_kd_loss, token_kd_losses

__all__ = [
    "DistillationLoss",
    "FeatureDistillation",
    "cosine_feature_loss",
    "mse_feature_loss",
    "soft_kd_loss",
    "token_kd_loss",
    "token_kd_losses",
]
