"""compress_callbacks: training-time distillation, pruning and quantization for the loop you already have.

>>> from compress_callbacks import CompressionManager, GradualMagnitudePruning
>>> manager = CompressionManager(GradualMagnitudePruning(target_sparsity=0.9, start_step=100, end_step=1000))
>>> manager.step
0
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first use, so optional parts stay optional)
_PUBLIC = {
    "CompressionManager": ".manager",
    "CompressionTechnique": ".callback",
    "GradualMagnitudePruning": ".pruning",
    "PruningConfig": ".pruning",
    "QuantizationAwareTraining": ".quantization",
    "QuantizationConfig": ".quantization",
    "DistillationLoss": ".distillation",
    "FeatureDistillation": ".distillation",
    "TeacherStudentAgreement": ".metrics",
    "Sparsity": ".metrics",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'compress_callbacks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
