"""Quantization-aware training: fake-quant math (``fake_quant``), the plan (``config``), the callback (``qat``), post-training
calibration (``ptq``) and the side-attribute contract with ``export`` (``spec``).

>>> from compress_callbacks.quantization import QuantizationAwareTraining
>>> QuantizationAwareTraining(start_step=800, weight_bits=4)
QuantizationAwareTraining(start_step=800, weight_bits=4, activation_bits=8, freeze_observers_step=None, freeze_bn_step=None, modules=None, exclude=None, weight_group_size=None, activation_scheme='static', learn_scales=False)
"""

from .config import QuantizationConfig
from .qat import QuantizationAwareTraining

__all__ = ["QuantizationAwareTraining", "QuantizationConfig"]
