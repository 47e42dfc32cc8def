"""The quantization plan as a dataclass: ``QuantizationAwareTraining``'s keyword arguments, validated here only.

``calibrate`` (post-training quantization) and the per-layer spec check their bit widths with the
same functions, and read the activation grid from here.

>>> QuantizationConfig(start_step=800, weight_bits=4).to_kwargs()["weight_bits"]
4
>>> QuantizationConfig(activation_bits=8.0)
Traceback (most recent call last):
...
compress_callbacks.config.ArgumentTypeError: `activation_bits` must be 8 or None (weight-only), got 8.0 (a float: write 8)
"""

from __future__ import annotations

import dataclasses

from ..config import ArgumentValueError, TechniqueConfig, check_bool, check_choice, check_int
from ..targets import ModuleSpec, normalize_spec

__all__ = [
    "ACTIVATION_QMAX",
    "ACTIVATION_QMIN",
    "MAX_WEIGHT_BITS",
    "MIN_WEIGHT_BITS",
    "ACTIVATION_SCHEMES",
    "DYNAMIC_ACTIVATION_QMAX",
    "DYNAMIC_ACTIVATION_QMIN",
    "MIN_WEIGHT_GROUP_SIZE",
    "QuantizationConfig",
    "check_activation_bits",
    "check_activation_scheme",
    "check_weight_group_size",
    "check_weight_bits",
]

MIN_WEIGHT_BITS, MAX_WEIGHT_BITS = 2, 8  # symmetric signed per-channel weights
ACTIVATION_BITS = 8  # layer inputs: per tensor, affine uint8 ...
ACTIVATION_QMIN, ACTIVATION_QMAX = 0, 255  # ... on this grid
#: "static": one observed range per layer input; "dynamic": a range per token, computed at run time
ACTIVATION_SCHEMES = ("static", "dynamic")
#: the per-token grid of ``activation_scheme="dynamic"``: signed int8, torchao's / XNNPACK's 8da4w activations
DYNAMIC_ACTIVATION_QMIN, DYNAMIC_ACTIVATION_QMAX = -128, 127
MIN_WEIGHT_GROUP_SIZE = 2  # a group of one weight would be its own scale (torchao refuses it too)


def check_weight_bits(value: object) -> int:
    """``weight_bits`` checked: an int from 2 to 8.

    >>> check_weight_bits(4)
    4
    """
    return check_int(value, "weight_bits", minimum=MIN_WEIGHT_BITS, maximum=MAX_WEIGHT_BITS)


def check_activation_bits(value: object) -> int | None:
    """``activation_bits`` checked: 8, or None for weight-only.

    >>> check_activation_bits(None) is None
    True
    """
    return check_int(
        value, "activation_bits", minimum=ACTIVATION_BITS, maximum=ACTIVATION_BITS, allow_none=True, note=" (weight-only)"
    )


def check_weight_group_size(value: object) -> int | None:
    """``weight_group_size`` checked: an int >= 2, or None (one scale per output channel).

    >>> check_weight_group_size(32), check_weight_group_size(None)
    (32, None)
    """
    return check_int(value, "weight_group_size", minimum=MIN_WEIGHT_GROUP_SIZE, allow_none=True, note=" (per output channel)")


def check_activation_scheme(value: object) -> str:
    """``activation_scheme`` checked: ``"static"`` or ``"dynamic"``.

    >>> check_activation_scheme("dynamic")
    'dynamic'
    """
    return check_choice(value, "activation_scheme", ACTIVATION_SCHEMES)


@dataclasses.dataclass
class QuantizationConfig(TechniqueConfig):
    """When and how to fake-quantize (see ``QuantizationAwareTraining`` for each field's meaning).

    >>> from compress_callbacks import QuantizationAwareTraining
    >>> QuantizationAwareTraining.from_config(QuantizationConfig(start_step=800, activation_bits=None)).activation_bits is None
    True

    Validation normalizes ``modules`` / ``exclude`` to lists (a generator is read once, here).
    """

    start_step: int = 0
    weight_bits: int = 8
    activation_bits: int | None = 8
    freeze_observers_step: int | None = None
    freeze_bn_step: int | None = None
    modules: ModuleSpec = None
    exclude: ModuleSpec = None
    weight_group_size: int | None = None
    activation_scheme: str = "static"
    learn_scales: bool = False

    def validate(self) -> None:
        self.start_step = check_int(self.start_step, "start_step", minimum=0)
        self.weight_bits = check_weight_bits(self.weight_bits)
        self.activation_bits = check_activation_bits(self.activation_bits)
        self.freeze_observers_step = check_int(self.freeze_observers_step, "freeze_observers_step", minimum=0, allow_none=True)
        self.freeze_bn_step = check_int(self.freeze_bn_step, "freeze_bn_step", minimum=0, allow_none=True)
        self.modules = None if self.modules is None else normalize_spec(self.modules, argument="modules")
        self.exclude = None if self.exclude is None else normalize_spec(self.exclude, argument="exclude")
        self.weight_group_size = check_weight_group_size(self.weight_group_size)
        self.activation_scheme = check_activation_scheme(self.activation_scheme)
        self.learn_scales = check_bool(self.learn_scales, "learn_scales")
        if self.activation_scheme == "dynamic" and self.activation_bits is None:
            raise ArgumentValueError(
                "activation_scheme",
                "`activation_scheme` 'dynamic' quantizes layer inputs per token at 8 bits: it needs `activation_bits=8` "
                "(with `activation_bits=None`, weight-only, leave `activation_scheme` at 'static')",
            )
