"""Layers whose forward a parent bypasses: what quantization can target, and how to keep it called.

Two PyTorch modules compute with their children's weights without calling the children:

- ``nn.MultiheadAttention`` always passes ``out_proj.weight`` to ``F.multi_head_attention_forward``:
  a fake-quantized ``out_proj`` never runs, and a replaced one (export's layers) has no ``weight``
  to read. :func:`quantizable_modules` leaves such layers out of a selection (with a warning; naming
  one exactly is an error).
- In eval under ``no_grad``, ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` take a
  fused "fast path" fed with ``linear1.weight``, ``linear2.weight``, ...: a fake-quantized child would
  silently compute in float. :func:`keep_on_module_path` switches such a parent to a subclass whose
  forward runs with the fast path off (``torch.backends.mha``), so its children's forwards run.

>>> import torch.nn as nn
>>> layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
>>> names, skipped = quantizable_modules(layer, modules=None, exclude=None)
>>> names, skipped
(['linear1', 'linear2'], ['self_attn.out_proj'])
>>> restore = keep_on_module_path(layer, names)
>>> type(layer).__name__, isinstance(layer, nn.TransformerEncoderLayer)
('ModulePathTransformerEncoderLayer', True)
>>> restore(); type(layer).__name__
'TransformerEncoderLayer'
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

from ..targets import ModuleSpec, normalize_spec, select_modules

__all__ = [
    "FAST_PATH_TYPES",
    "fast_path_disabled",
    "weights_read_by_parent",
    "quantizable_modules",
    "warn_left_out",
    "keep_on_module_path",
]

#: modules that may compute with their children's weights in one fused kernel (eval, no_grad)
FAST_PATH_TYPES: tuple[type[nn.Module], ...] = (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.MultiheadAttention)


@contextlib.contextmanager
def fast_path_disabled() -> Iterator[None]:
    """Within the block, PyTorch's fused Transformer / attention fast path is off (then restored).

    >>> with fast_path_disabled():
    ...     torch.backends.mha.get_fastpath_enabled()
    False
    """
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def weights_read_by_parent(root: nn.Module) -> dict[str, str]:
    """``{layer name: parent name}`` of the layers whose parent reads their weight itself (the
    ``out_proj`` of every ``nn.MultiheadAttention``).

    >>> weights_read_by_parent(nn.Sequential(nn.MultiheadAttention(4, 2), nn.Linear(4, 4)))
    {'0.out_proj': '0'}
    """
    return {f"{name}.out_proj" if name else "out_proj": name
            for name, module in root.named_modules() if isinstance(module, nn.MultiheadAttention)}


def quantizable_modules(
    root: nn.Module, *, modules: ModuleSpec, exclude: ModuleSpec, argument: str = "modules", warn_shared: bool = True
) -> tuple[list[str], list[str]]:
    """``(targets, skipped)``: names of the selected layers whose forward runs, and of those left out
    because their parent reads their weight (:func:`weights_read_by_parent`).

    Raises ``ValueError`` if ``modules`` names such a layer exactly, or if nothing is left.
    """
    parents = weights_read_by_parent(root)
    modules = normalize_spec(modules, argument=argument) or None  # read once (a generator)
    explicit = {item for item in modules or () if isinstance(item, str) and not item.startswith("re:")}
    targets, skipped = [], []
    for name, _ in select_modules(root, modules=modules, exclude=exclude, argument=argument, warn_shared=warn_shared):
        if name not in parents:
            targets.append(name)
        elif name in explicit:
            raise ValueError(
                f"`{argument}`: {name!r} cannot be quantized: nn.MultiheadAttention {parents[name]!r} computes "
                "with its weight directly and never calls it; leave it out"
            )
        else:
            skipped.append(name)
    if not targets:
        raise ValueError(f"`{argument}`: every selected layer ({skipped[:3]}) is one whose parent reads its weight itself")
    return targets, skipped


def warn_left_out(caller: str, skipped: list[str], stacklevel: int) -> None:
    """Warn that ``caller`` leaves the layers ``skipped`` (from :func:`quantizable_modules`) float."""
    if skipped:
        warnings.warn(
            f"{caller}: leaving out {skipped[:5]}{'...' if len(skipped) > 5 else ''}: nn.MultiheadAttention "
            "computes with its out_proj weight directly, never calling the layer, so it stays float; "
            "exclude it to silence this warning",
            stacklevel=stacklevel + 1,
        )


def _module_path_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    with fast_path_disabled():
        return self._compress_original_class.forward(self, *args, **kwargs)


_MODULE_PATH_CLASSES: dict[type, type] = {}


def _module_path_class(cls: type) -> type:
    if cls not in _MODULE_PATH_CLASSES:
        sub = type("ModulePath" + cls.__name__, (cls,), {"forward": _module_path_forward, "_compress_original_class": cls})
        sub.__module__ = __name__
        _MODULE_PATH_CLASSES[cls] = sub
    return _MODULE_PATH_CLASSES[cls]


# module-level names so a model pickled while switched can be loaded back
ModulePathTransformerEncoder, ModulePathTransformerEncoderLayer, ModulePathMultiheadAttention = (
    _module_path_class(cls) for cls in FAST_PATH_TYPES
)


def keep_on_module_path(root: nn.Module, names: Iterable[str]) -> Callable[[], None]:
    """Switch each fast-path module (:data:`FAST_PATH_TYPES`) that holds one of the layers ``names``
    to a subclass whose forward runs with the fast path off; return the function that switches them back."""
    named = dict(root.named_modules())
    layers = {id(named[name]) for name in names}
    switched = []
    for module in named.values():
        cls = type(module)
        if isinstance(module, FAST_PATH_TYPES) and cls not in _MODULE_PATH_CLASSES.values():
            if any(id(child) in layers for child in module.modules()):
                module.__class__ = _module_path_class(cls)
                switched.append((module, cls))

    def restore() -> None:
        for module, cls in switched:
            module.__class__ = cls

    return restore
