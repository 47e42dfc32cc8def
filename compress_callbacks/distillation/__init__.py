"""Knowledge distillation: pure losses, the ``DistillationLoss`` wrapper, cached teacher logits, feature matching.

>>> from compress_callbacks.distillation import DistillationLoss, FeatureDistillation, soft_kd_loss
>>> DistillationLoss(None, temperature=2.0, alpha=0.5, divergence="jsd", beta=0.3).beta
0.3
"""

from .cache import TeacherLogitsCache, TopKLogits, cache_teacher_logits, load_teacher_logits
from .divergences import divergence_rows
from .features import FeatureDistillation
from .loss import DistillationLoss
from .losses import cosine_feature_loss, mse_feature_loss, soft_kd_loss, token_kd_loss, token_kd_losses

__all__ = [
    "DistillationLoss",
    "FeatureDistillation",
    "TeacherLogitsCache",
    "TopKLogits",
    "cache_teacher_logits",
    "cosine_feature_loss",
    "divergence_rows",
    "load_teacher_logits",
    "mse_feature_loss",
    "soft_kd_loss",
    "token_kd_loss",
    "token_kd_losses",
]
