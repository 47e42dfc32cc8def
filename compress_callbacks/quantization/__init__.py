"""Quantization-aware training: fake-quant math (``fake_quant``), the callback (``qat``) and the
side-attribute contract with ``export`` (``spec``)."""

from .qat import QuantizationAwareTraining

__all__ = ["QuantizationAwareTraining"]
