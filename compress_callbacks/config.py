"""Technique configs: small dataclasses, validated in one place, separate from the code that applies them.

Each technique's keyword arguments form a dataclass (:class:`~compress_callbacks.pruning.config.PruningConfig`,
:class:`~compress_callbacks.quantization.config.QuantizationConfig`) whose ``__post_init__`` checks and
normalizes every field with the checks below. The callbacks build their config from their keyword
arguments and read it; recipes, ``calibrate`` and the quantization spec validate through the same
dataclasses. An invalid field raises :class:`ArgumentValueError` / :class:`ArgumentTypeError`
(subclasses of ``ValueError`` / ``TypeError``) whose ``argument`` names the field, so a recipe can
point at the key without reading the message.

One rule for every int argument: an ``int`` (or an integral number type such as ``numpy.int64``);
``bool`` and ``float`` are refused, even an integral float such as ``8.0``, so a config and its
recipe always hold the same value. Float arguments take any real number (not ``bool``).

>>> check_int(8, "weight_bits", minimum=2, maximum=8)
8
>>> check_int(8.0, "weight_bits", minimum=2, maximum=8)
Traceback (most recent call last):
...
compress_callbacks.config.ArgumentTypeError: `weight_bits` must be an int from 2 to 8, got 8.0 (a float: write 8)
>>> check_fraction(1.5, "target_sparsity")
Traceback (most recent call last):
...
compress_callbacks.config.ArgumentValueError: `target_sparsity` must be a float in [0, 1), got 1.5
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "ArgumentValueError",
    "TechniqueConfig",
    "check_bool",
    "check_choice",
    "check_fraction",
    "check_int",
]


class ArgumentError(Exception):
    """An invalid argument; ``argument`` names it (the constructor keyword, the recipe key).

    >>> err = ArgumentValueError("end_step", "`end_step` (5) must be > `start_step` (10)")
    >>> isinstance(err, ValueError), err.argument
    (True, 'end_step')
    """

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(message)
        self.argument = argument


class ArgumentValueError(ArgumentError, ValueError):
    """An argument of the right type outside its accepted range.

    >>> try:
    ...     check_int(0, "update_every", minimum=1)
    ... except ValueError as err:
    ...     print(err.argument)
    update_every
    """


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument of the wrong type.

    >>> try:
    ...     check_fraction("high", "target_sparsity")
    ... except TypeError as err:
    ...     print(err.argument)
    target_sparsity
    """


def _int_range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and minimum == maximum:
        return str(minimum)
    if maximum is None:
        return "an int" if minimum is None else f"an int >= {minimum}"
    return f"an int from {minimum} to {maximum}"


def check_int(
    value: Any,
    argument: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    allow_none: bool = False,
    note: str = "",
) -> int | None:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (or None when allowed); raise naming ``argument``.

    ``note`` is added to the accepted range in messages (``"8 or None (weight-only)"``).

    >>> check_int(None, "freeze_bn_step", minimum=0, allow_none=True) is None
    True
    >>> check_int(True, "start_step", minimum=0)
    Traceback (most recent call last):
    ...
    compress_callbacks.config.ArgumentTypeError: `start_step` must be an int >= 0, got True
    """
    if value is None and allow_none:
        return None
    accepted = _int_range(minimum, maximum) + (" or None" if allow_none else "") + note
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = ""
        if isinstance(value, float) and value.is_integer():
            hint = f" (a float: write {int(value)})"
        raise ArgumentTypeError(argument, f"`{argument}` must be {accepted}, got {value!r}{hint}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ArgumentValueError(argument, f"`{argument}` must be {accepted}, got {value!r}")
    return value


def check_fraction(value: Any, argument: str, *, allow_none: bool = False) -> float | None:
    """``value`` as a float in ``[0, 1)`` (or None when allowed); raise naming ``argument``.

    >>> check_fraction(0, "initial_sparsity")
    0.0
    """
    if value is None and allow_none:
        return None
    accepted = "a float in [0, 1)" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(argument, f"`{argument}` must be {accepted}, got {value!r}")
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ArgumentValueError(argument, f"`{argument}` must be {accepted}, got {value!r}")
    return float(value)


def check_bool(value: Any, argument: str) -> bool:
    """``value`` if it is a ``bool`` (not 0 / 1 / "yes"); raise naming ``argument``.

    >>> check_bool(True, "learn_scales")
    True
    >>> check_bool(1, "learn_scales")
    Traceback (most recent call last):
    ...
    compress_callbacks.config.ArgumentTypeError: `learn_scales` must be True or False, got 1
    """
    if not isinstance(value, bool):
        raise ArgumentTypeError(argument, f"`{argument}` must be True or False, got {value!r}")
    return value


def check_choice(value: Any, argument: str, choices: tuple[str, ...], accepted: str = "") -> str:
    """``value`` if it is one of the strings ``choices``; raise naming ``argument`` and the choices.

    >>> check_choice("global", "scope", ("layer", "global"))
    'global'
    """
    accepted = accepted or " or ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise ArgumentTypeError(argument, f"`{argument}` must be a string: {accepted}; got {value!r}")
    if value not in choices:
        raise ArgumentValueError(argument, f"`{argument}` must be {accepted}, got {value!r}")
    return value


@dataclasses.dataclass
class TechniqueConfig:
    """Base of the technique configs: ``__post_init__`` runs ``validate``, which checks and normalizes.

    >>> @dataclasses.dataclass
    ... class EveryConfig(TechniqueConfig):
    ...     every: int = 1
    ...     def validate(self):
    ...         self.every = check_int(self.every, "every", minimum=1)
    >>> EveryConfig(every=3).to_kwargs()
    {'every': 3}
    >>> EveryConfig(every=0)
    Traceback (most recent call last):
    ...
    compress_callbacks.config.ArgumentValueError: `every` must be an int >= 1, got 0

    Subclasses declare one field per keyword argument of their callback and implement ``validate``
    (assigning each checked value back, so the config always holds normalized values).
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (raise :class:`ArgumentError`) and store its normalized value."""

    def to_kwargs(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this config (and the callback it configures); lists are copies."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.init}
        return {name: list(value) if isinstance(value, list) else value for name, value in values.items()}
