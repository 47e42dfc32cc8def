"""Which modules a callback touches: names, ``re:`` regexes and module types, on the unwrapped model.

>>> import torch.nn as nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> [name for name, _ in select_modules(model, modules=None, exclude=["re:2"])]
['0']
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Union

import torch.nn as nn
from accelerate.utils import extract_model_from_parallel

from .config import ArgumentTypeError, ArgumentValueError

__all__ = [
    "DEFAULT_TARGET_TYPES",
    "ModuleSpec",
    "is_default_target",
    "is_transformers_conv1d",
    "normalize_spec",
    "require_disjoint_targets",
    "require_optimizer_owns_weights",
    "require_unsharded",
    "select_modules",
    "transformers_conv1d_class",
    "unwrap_model",
    "weight_output_dim",
]

#: the torch layers targeted by default (and Transformers ``Conv1D``, see :func:`is_default_target`)
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


def transformers_conv1d_class() -> type | None:
    """Transformers' ``Conv1D`` class if transformers is loaded, else None (never imports it: a model
    holding a ``Conv1D`` has imported it already)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_transformers_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Transformers' ``Conv1D`` (GPT-2's projections: a Linear whose weight is
    stored ``[in, out]``).

    >>> is_transformers_conv1d(nn.Linear(2, 2))
    False
    """
    conv1d = transformers_conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def is_default_target(module: nn.Module) -> bool:
    """Whether ``modules=None`` selects ``module``: an ``nn.Linear``, ``nn.Conv1d/2d/3d`` or Transformers ``Conv1D``."""
    return isinstance(module, DEFAULT_TARGET_TYPES) or is_transformers_conv1d(module)


def weight_output_dim(module: nn.Module) -> int:
    """The dim of ``module.weight`` that indexes output channels: 1 for Transformers ``Conv1D``
    (``[in, out]``) and ConvTranspose (``[in, out / groups, *kernel]``), 0 for Linear and Conv.

    >>> weight_output_dim(nn.Linear(4, 2)), weight_output_dim(nn.ConvTranspose2d(4, 2, 3))
    (0, 1)
    """
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) or is_transformers_conv1d(module) else 0


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


def _shared_weights(root: nn.Module, chosen: list[tuple[str, nn.Module]]) -> dict[str, list[str]]:
    """``{chosen name: [names of modules outside chosen that hold the same weight Parameter]}`` (tied weights)."""
    holders: dict[int, list[str]] = {}
    for name, module in root.named_modules():
        for param in module._parameters.values():
            if param is not None:
                holders.setdefault(id(param), []).append(name)
    chosen_names = {name for name, _ in chosen}
    shared = {}
    for name, module in chosen:
        others = [other for other in holders.get(id(module.weight), []) if other not in chosen_names]
        if others:
            shared[name] = others
    return shared


def select_modules(
    model: nn.Module,
    *,
    modules: ModuleSpec = None,
    exclude: ModuleSpec = None,
    argument: str = "modules",
    require_weight: bool = True,
    warn_shared: bool = True,
) -> list[tuple[str, nn.Module]]:
    """Return ``(qualified_name, module)`` pairs the callback should touch, in model order.

    ``modules=None`` selects every Linear, Conv1d/2d/3d and Transformers Conv1D. A name or regex in ``modules`` or
    ``exclude`` that matches nothing raises ``ValueError`` (a typo should not silently compress
    nothing, or compress what was meant to be kept), and so does a selection that ends up empty.
    A module named in ``modules`` must have a ``weight``; a regex or a type may also match
    containers without one, which are skipped. The model itself is named ``""``: a bare layer
    (the model is an ``nn.Linear``) is selected by default, by its type, or as ``""``.

    A module whose weight is shared with a module that is not selected (an LM head tied to the token
    embedding) is skipped, with a warning naming both (``warn_shared=False``: silently), unless it is
    named exactly in ``modules``: compressing it would compress the other module's weight too.

    >>> [name for name, _ in select_modules(nn.Linear(4, 2))]
    ['']
    >>> embedding, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    >>> head.weight = embedding.weight   # tied
    >>> tied = nn.ModuleDict({"embed": embedding, "body": nn.Linear(4, 4), "head": head})
    >>> [name for name, _ in select_modules(tied, warn_shared=False)]
    ['body']
    >>> [name for name, _ in select_modules(tied, modules=["body", "head"])]
    ['body', 'head']
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
        elif not is_default_target(mod):
            continue
        if any(_matches(name, mod, item) for item in excluded):
            continue
        if require_weight and not _has_weight(mod):
            if name in include:  # named exactly: a regex or a type may also match containers, skipped
                raise ValueError(f"`{argument}`: module {name!r} has no `weight` parameter to compress")
            continue
        chosen.append((name, mod))
    shared = {name: others for name, others in _shared_weights(root, chosen).items() if name not in include}
    if shared:
        chosen = [(name, mod) for name, mod in chosen if name not in shared]
        if warn_shared:
            warnings.warn(
                "compress_callbacks: skipping "
                + "; ".join(f"{name!r} (its weight is also the weight of {others[0]!r})" for name, others in shared.items())
                + ": a weight shared with a module that is not targeted (a tied embedding / LM head) is left alone "
                f"unless its module is named in `{argument}` (e.g. {argument}=[{next(iter(shared))!r}, ...])",
                stacklevel=3,
            )
    if not chosen:
        raise ValueError(
            f"`{argument}`/`exclude` matched no module with a weight in {type(root).__name__}; "
            f"by default every nn.Linear, nn.Conv1d/2d/3d and Transformers Conv1D is targeted"
            + (f" (skipped for a weight shared with a module not targeted: {sorted(shared)})" if shared else "")
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


def require_disjoint_targets(model: nn.Module, callbacks: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming the layers if two callbacks of one kind (one an instance of the
    other's class) target the same weight: two fake-quants would wrap a layer twice, two prunings would
    compose their masks silently. Techniques of different kinds may share layers (prune and quantize).

    Each callback lists its targets with ``target_modules(model)``; weights are compared by identity,
    so a weight tied between two modules counts once.

    >>> from compress_callbacks import GradualMagnitudePruning
    >>> def gmp(**kwargs):
    ...     return GradualMagnitudePruning(target_sparsity=0.5, start_step=0, end_step=4, **kwargs)
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    >>> require_disjoint_targets(model, [gmp(modules=["0"]), gmp(modules=["1"])])
    >>> require_disjoint_targets(model, [gmp(), gmp(modules=["1"])])
    Traceback (most recent call last):
    ...
    ValueError: `modules`: GradualMagnitudePruning #0 and #1 both target '1'; give each layer to one of them (`modules` / `exclude`)
    """
    earlier: list[tuple[int, Any, dict[int, str]]] = []
    for index, callback in enumerate(callbacks):
        weights = {id(module.weight): name for name, module in callback.target_modules(model)}
        for other_index, other, other_weights in earlier:
            if not (isinstance(callback, type(other)) or isinstance(other, type(callback))):
                continue
            shared = [repr(name) if other_weights[key] == name else f"{name!r} (its weight is {other_weights[key]!r}'s)"
                      for key, name in weights.items() if key in other_weights]
            if shared:
                listed = ", ".join(shared[:5]) + (", ..." if len(shared) > 5 else "")
                raise ValueError(
                    f"`modules`: {type(other).__name__} #{other_index} and #{index} both target {listed}; "
                    "give each layer to one of them (`modules` / `exclude`)"
                )
        earlier.append((index, callback, weights))
