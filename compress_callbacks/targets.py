"""Which modules a callback touches: names, ``re:`` regexes and module types, on the unwrapped model.

>>> import torch.nn as nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> [name for name, _ in select_modules(model, modules=None, exclude=["re:2"])]
['0']
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Union

import torch.nn as nn
from accelerate.utils import extract_model_from_parallel

from .config import ArgumentTypeError, ArgumentValueError

__all__ = [
    "DEFAULT_TARGET_TYPES",
    "ModuleSpec",
    "normalize_spec",
    "require_optimizer_owns_weights",
    "require_unsharded",
    "select_modules",
    "unwrap_model",
]

DEFAULT_TARGET_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

ModuleSpec = Union[str, type, Iterable[Union[str, type]], None]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / ``torch.compile`` / FSDP / DeepSpeed wrappers, nested in any order.

    Each layer is removed by Accelerate's ``extract_model_from_parallel``; repeating it also unwraps
    what Accelerate leaves in one pass (a compiled model inside DDP). FSDP2 (``fully_shard``) wraps
    nothing: its model is already the module itself.

    >>> import torch.nn as nn
    >>> unwrap_model(nn.DataParallel(nn.Linear(2, 2))).__class__.__name__
    'Linear'
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        model = extract_model_from_parallel(model, keep_torch_compile=False)
    return model


def normalize_spec(spec: ModuleSpec, *, argument: str) -> list[str | type]:
    """Validate a ``modules`` / ``exclude`` argument and return it as a new list (read once: a
    generator is consumed here, and only here).

    >>> normalize_spec("re:.*attn.*", argument="modules")
    ['re:.*attn.*']
    >>> normalize_spec((name for name in ["0", "2"]), argument="exclude")
    ['0', '2']
    """
    if spec is None:
        return []
    if isinstance(spec, (str, type)):
        items: list = [spec]
    elif isinstance(spec, Iterable) and not isinstance(spec, (bytes, dict, nn.Module)):
        items = list(spec)
    else:
        raise ArgumentTypeError(
            argument, f"`{argument}` takes a module name, a 're:' regex, an nn.Module subclass or a list of them; got {spec!r}"
        )
    for item in items:
        if isinstance(item, str):
            if item.startswith("re:"):
                try:
                    re.compile(item[3:])
                except re.error as err:
                    raise ArgumentValueError(argument, f"`{argument}`: invalid regex {item!r}: {err}") from None
        elif not (isinstance(item, type) and issubclass(item, nn.Module)):
            raise ArgumentTypeError(
                argument, f"`{argument}` takes module names, 're:' regexes or nn.Module subclasses; got {item!r}"
            )
    return items


def _matches(name: str, module: nn.Module, item: str | type) -> bool:
    if isinstance(item, type):
        return isinstance(module, item)
    if item.startswith("re:"):
        return re.fullmatch(item[3:], name) is not None
    return name == item


def _has_weight(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), nn.Parameter)


def _require_every_name_matches(
    named: list[tuple[str, nn.Module]], items: list[str | type], argument: str, root: nn.Module, *, with_weight: bool
) -> None:
    """Each name or regex in ``items`` must match a module (``with_weight``: a regex, one with a weight)."""
    for item in items:
        if isinstance(item, type):
            continue
        matched = [(n, m) for n, m in named if _matches(n, m, item)]
        if not matched:
            raise ValueError(f"`{argument}`: {item!r} matches no module of {type(root).__name__}")
        if with_weight and item.startswith("re:") and not any(_has_weight(m) for _, m in matched):
            raise ValueError(
                f"`{argument}`: {item!r} matches only modules without a `weight` parameter "
                f"({', '.join(repr(n) for n, _ in matched[:3])}{', ...' if len(matched) > 3 else ''})"
            )


def select_modules(
    model: nn.Module,
    *,
    modules: ModuleSpec = None,
    exclude: ModuleSpec = None,
    argument: str = "modules",
    require_weight: bool = True,
) -> list[tuple[str, nn.Module]]:
    """Return ``(qualified_name, module)`` pairs the callback should touch, in model order.

    ``modules=None`` selects every Linear and Conv1d/2d/3d. A name or regex in ``modules`` or
    ``exclude`` that matches nothing raises ``ValueError`` (a typo should not silently compress
    nothing, or compress what was meant to be kept), and so does a selection that ends up empty.
    A module named in ``modules`` must have a ``weight``; a regex or a type may also match
    containers without one, which are skipped. The model itself is named ``""``: a bare layer
    (the model is an ``nn.Linear``) is selected by default, by its type, or as ``""``.

    >>> [name for name, _ in select_modules(nn.Linear(4, 2))]
    ['']
    """
    include = normalize_spec(modules, argument=argument)
    excluded = normalize_spec(exclude, argument="exclude")
    root = unwrap_model(model)
    named = list(root.named_modules())
    _require_every_name_matches(named, include, argument, root, with_weight=require_weight)
    _require_every_name_matches(named, excluded, "exclude", root, with_weight=False)
    chosen = []
    for name, mod in named:
        if include:
            if not any(_matches(name, mod, item) for item in include):
                continue
        elif not isinstance(mod, DEFAULT_TARGET_TYPES):
            continue
        if any(_matches(name, mod, item) for item in excluded):
            continue
        if require_weight and not _has_weight(mod):
            if name in include:  # named exactly: a regex or a type may also match containers, skipped
                raise ValueError(f"`{argument}`: module {name!r} has no `weight` parameter to compress")
            continue
        chosen.append((name, mod))
    if not chosen:
        raise ValueError(
            f"`{argument}`/`exclude` matched no module with a weight in {type(root).__name__}; "
            f"by default every nn.Linear and nn.Conv1d/2d/3d is targeted"
        )
    return chosen


def _sharding(model: nn.Module) -> tuple[str, str, bool] | None:
    """``(kind, where, FSDP2 layout)`` if ``model`` holds weights sharded across ranks, else None."""
    from ._dist import is_sharded, supported_sharding

    for name, module in model.named_modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            return "FSDP", f"module {name or '<root>'!r}", False
    found = None
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id"):
            return "DeepSpeed ZeRO-3", f"parameter {name!r}", False
        if is_sharded(param):
            if not supported_sharding(param):
                return "DTensor: tensor parallel, a multi-dimensional mesh or a mesh of some ranks only", f"parameter {name!r}", False
            found = found or ("DTensor: FSDP2 fully_shard", f"parameter {name!r}", True)
    return found


def require_unsharded(model: nn.Module, callbacks: Sequence[Any] = ()) -> None:
    """Raise ``NotImplementedError`` if ``model``'s weights are sharded in a way ``callbacks`` cannot handle.

    Callbacks with ``supports_sharded_weights = True`` (pruning, QAT) handle FSDP2's layout (``fully_shard``:
    DTensor weights sharded along dim 0 over a 1-D mesh); anything else needs each rank to hold whole
    weights, since on shards it would silently rank pieces of a layer (or fail deep inside a DTensor op).

    >>> require_unsharded(nn.Linear(2, 2))  # plain and DDP models pass
    """
    found = _sharding(model)
    if found is None:
        return
    kind, where, layout_supported = found
    unable = [type(cb).__name__ for cb in callbacks if not getattr(cb, "supports_sharded_weights", False)]
    if layout_supported and callbacks and not unable:
        return
    reason = (f"{', '.join(unable)} needs every rank to hold whole weights" if layout_supported and unable
              else "compress_callbacks supports sharded weights only in FSDP2's layout (fully_shard: dim 0 over a 1-D mesh), "
                   "for GradualMagnitudePruning and QuantizationAwareTraining")
    raise NotImplementedError(
        f"{reason}, but this model is sharded ({kind}; {where}). "
        "Use DDP (Accelerate's default multi-process mode), or train without sharding"
    )


def require_optimizer_owns_weights(selected: Sequence[tuple[str, nn.Module]], optimizer) -> None:
    """Raise ``ValueError`` if ``optimizer`` (when given) does not update every selected ``.weight``."""
    if optimizer is None:
        return
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, module in selected if id(module.weight) not in owned]
    if missing:
        raise ValueError(
            f"`optimizer` does not own the weights of {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            "attach the optimizer that trains this model (after accelerator.prepare)"
        )
