"""Structured pruning made physical: remove pruned channels and heads, get a smaller dense model.

>>> import torch, torch.nn as nn
>>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
>>> with torch.no_grad():
...     model[0].weight[:2] = 0; model[0].bias[:2] = 0      # two channels pruned whole
>>> x = torch.randn(4, 8)
>>> small = shrink(model, x)
>>> small[0], small[2]
(Linear(in_features=8, out_features=4, bias=True), Linear(in_features=4, out_features=3, bias=True))
>>> torch.allclose(small(x), model(x), atol=1e-6)
True
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from typing import Any

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..targets import unwrap_model
from ..pruning.groups import ChannelGroups, Unit, split_example_inputs, trace_groups

__all__ = ["shrink", "load_shrunk", "apply_plan", "pruned_units"]


def pruned_units(groups: ChannelGroups, tensors: dict[str, torch.Tensor]) -> list[Unit]:
    """Units with at least one producer row that is all zero: channels someone pruned."""
    found = []
    for unit in groups.units:
        for name, dim, index in unit.weight_rows():
            if not bool(tensors[name].select(dim, index).any()):
                found.append(unit)
                break
    return found


def shrink(model: nn.Module, example_inputs: Any) -> nn.Module:
    """A copy of ``model`` with its pruned output channels (and attention heads) removed, and the
    matching inputs removed from every layer that consumes them.

    Channels are followed through the model's real data flow, traced with ``torch.export`` on
    ``example_inputs`` (a tensor, a tuple of positional inputs, or a dict of keyword inputs such as
    ``{"input_ids": ..., "attention_mask": ...}``). A channel goes when it carries exactly zero
    into every consumer (its weight row, bias and BatchNorm channel are zero: what
    ``GradualMagnitudePruning(granularity="channel")`` prunes), together with every channel it is
    coupled to (residual adds, gates, heads). Pruned channels that cannot go (normalised together
    with others, reaching the output, or not exactly zero) stay and are named in a warning; a
    pattern the tracer cannot follow raises ``ValueError`` before anything changes. The result is
    checked against ``model`` on ``example_inputs`` before it is returned; ``model`` is not changed.
    """
    root = unwrap_model(model)
    if not isinstance(root, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    groups = trace_groups(root, example_inputs)
    tensors = dict(root.named_parameters(remove_duplicate=False))
    tensors.update(dict(root.named_buffers(remove_duplicate=False)))
    pruned = pruned_units(groups, tensors)
    blocked = [u for u in pruned if u.unsupported and not u.problems]
    if blocked:
        layers = sorted({_layer(n) for u in blocked for n in u.producers})
        raise ValueError(f"shrink cannot follow the pruned channels of {layers[:5]} through "
                         f"{sorted({w for u in blocked for w in u.unsupported})[:3]}; nothing was changed")
    removable = groups.removable()
    _warn_left_in_place(pruned, {u.index for u in removable})
    small = copy.deepcopy(root)
    apply_plan(small, groups.plan(removable))
    _check_same_outputs(root, small, example_inputs)
    unsaid = _update_config(small, groups, removable)
    if unsaid:
        warnings.warn(f"shrink: {type(small.config).__name__} cannot describe the shrunk model ({'; '.join(unsaid)}), so "
                      "save_pretrained / from_pretrained would not rebuild it. Save `model.state_dict()` instead and load it "
                      "into a freshly built model with `compress_callbacks.export.load_shrunk(fresh_model, state_dict)`", stacklevel=2)
    return small


def load_shrunk(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Load a shrunk ``state_dict`` into ``model``, a freshly built copy of the original architecture:
    every parameter and buffer takes the saved shape, layer sizes follow, then the values load
    (``strict``). Returns ``model``. The route for models whose config cannot describe the shrunk
    sizes (layers of different widths, or a config that derives the head size from the width).

    >>> small = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 3))
    >>> load_shrunk(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), small.state_dict())[0]
    Linear(in_features=4, out_features=2, bias=True)
    """
    root = unwrap_model(model)
    before = {id(m): _sizes(m) for m in root.modules()}
    with torch.no_grad():
        for name, saved in state_dict.items():
            module_name, _, attr = name.rpartition(".")
            module = root.get_submodule(module_name)
            current = getattr(module, attr, None)
            if isinstance(current, torch.Tensor) and current.shape != saved.shape:
                fresh = torch.empty(saved.shape, dtype=current.dtype, device=current.device)
                if attr in module._parameters:
                    module._parameters[attr] = nn.Parameter(fresh, requires_grad=current.requires_grad)
                else:
                    module._buffers[attr] = fresh
    for module in root.modules():
        _update_sizes(module, before[id(module)])
    _sync_attention_attributes(root)
    root.load_state_dict(state_dict, strict=True)
    return model


def _layer(weight_name: str) -> str:
    return weight_name.rsplit(".", 1)[0]


def _warn_left_in_place(pruned: list[Unit], removed: set[int]) -> None:
    left: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for unit in pruned:
        if unit.index in removed:
            continue
        why = "; ".join(unit.problems + unit.unsupported) or "a consumer still receives a nonzero value from them " \
            "(prune the bias and BatchNorm channel with the weights)"
        for name in sorted(unit.producers):
            left[_layer(name)][why] += 1
    if left:
        lines = [f"{layer}: {count} pruned channel(s) kept, {why}" for layer, reasons in left.items() for why, count in reasons.items()]
        warnings.warn("shrink left these layers as they are:\n  " + "\n  ".join(lines), stacklevel=3)


@torch.no_grad()
def apply_plan(model: nn.Module, plan: dict[str, dict[int, torch.Tensor]]) -> None:
    """Remove the planned slices (``{tensor name: {dim: indices}}``) from ``model``'s parameters and
    buffers in place, and update the layers' size attributes to match."""
    owners: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None:
                owners[id(tensor)].append((module, attr))
    before = {id(m): _sizes(m) for m in model.modules()}
    for name, dims in plan.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        old = getattr(module, attr)
        new = old.detach()
        for dim, index in sorted(dims.items()):
            keep = torch.ones(new.shape[dim], dtype=torch.bool)
            keep[index] = False
            new = new.index_select(dim, keep.nonzero().squeeze(1).to(new.device))
        for owner, owner_attr in owners[id(old)]:
            if owner_attr in owner._parameters:
                owner._parameters[owner_attr] = nn.Parameter(new.clone(), requires_grad=old.requires_grad)
            else:
                owner._buffers[owner_attr] = new.clone()
    for module in model.modules():
        _update_sizes(module, before[id(module)])


def _sizes(module: nn.Module) -> dict[str, int]:
    return {k: getattr(module, k) for k in ("in_features", "out_features", "in_channels", "out_channels", "groups",
                                              "num_features", "nf") if isinstance(getattr(module, k, None), int)}


def _update_sizes(module: nn.Module, old: dict[str, int]) -> None:
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape[0], weight.shape[1]
    elif isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        if old["groups"] > 1 and old["in_channels"] == old["groups"]:  # depthwise: one group per input channel
            module.groups = weight.shape[0] // (old["out_channels"] // old["groups"])
        module.out_channels, module.in_channels = weight.shape[0], weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.batchnorm._NormBase) and weight is not None:
        module.num_features = weight.shape[0]
    elif type(module).__name__ == "Conv1D" and "nf" in old:  # Transformers' Conv1D: weight [in, out]
        module.nf = weight.shape[1]


def _sync_attention_attributes(model: nn.Module) -> None:
    """Transformers attention / MLP modules: head counts and widths follow their (shrunk) layers."""
    for module in model.modules():
        query = getattr(module, "q_proj", None) or getattr(module, "query", None)
        key = getattr(module, "k_proj", None) or getattr(module, "key", None)
        head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
        if isinstance(query, nn.Linear) and isinstance(head_dim, int) and head_dim > 0:
            heads = query.out_features // head_dim
            for attr in ("num_attention_heads", "num_heads"):
                if isinstance(getattr(module, attr, None), int):
                    setattr(module, attr, heads)
            if isinstance(getattr(module, "all_head_size", None), int):
                module.all_head_size = heads * head_dim
            if isinstance(key, nn.Linear) and isinstance(getattr(module, "num_key_value_heads", None), int):
                module.num_key_value_heads = key.out_features // head_dim
        up = getattr(module, "up_proj", None)
        if isinstance(up, nn.Linear) and isinstance(getattr(module, "intermediate_size", None), int):
            module.intermediate_size = up.out_features


def _update_config(small: nn.Module, groups: ChannelGroups, removed: list[Unit]) -> list[str]:
    """Write the shrunk sizes into a Transformers config; what it cannot describe, in words."""
    _sync_attention_attributes(small)
    config = getattr(small, "config", None)
    if config is None or not hasattr(config, "to_dict") or not removed:
        return []
    gone = {u.index for u in removed}
    families: dict[tuple[str, frozenset], list[Unit]] = defaultdict(list)
    for unit in groups.units:
        if unit.producers:
            families[(unit.kind, frozenset(unit.producers))].append(unit)
    intermediate = getattr(config, "intermediate_size", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    ffn, attention = set(), set()
    for (kind, _), units in families.items():
        kept = sum(u.index not in gone for u in units)
        if kind == "channel" and len(units) == intermediate:
            ffn.add(kept)
        elif kind == "head" and len(units) == kv_heads:
            attention.add(kept)
    unsaid = []
    if len(ffn) > 1:
        unsaid.append(f"FFN layers keep different widths {sorted(ffn)}")
    elif ffn and ffn != {intermediate}:
        config.intermediate_size = ffn.pop()
    if len(attention) > 1:
        unsaid.append(f"attention layers keep different numbers of heads {sorted(attention)}")
    elif attention and attention != {kv_heads}:
        kept = attention.pop()
        if "head_dim" not in config.to_dict():
            unsaid.append(f"it derives the head size from hidden_size / num_attention_heads, so it cannot hold "
                          f"{kept * (heads // kv_heads)} heads of the same size")
        else:
            config.head_dim = config.head_dim or config.hidden_size // heads
            config.num_attention_heads = kept * (heads // kv_heads)
            if getattr(config, "num_key_value_heads", None):
                config.num_key_value_heads = kept
    return unsaid


def _outputs(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    args, kwargs = split_example_inputs(example_inputs)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            out = model(*args, **kwargs)
    finally:
        for module, mode in modes.items():
            module.training = mode
    return [t for t in pytree.tree_leaves(out.to_tuple() if hasattr(out, "to_tuple") else out) if isinstance(t, torch.Tensor)]


def _check_same_outputs(original: nn.Module, small: nn.Module, example_inputs: Any) -> None:
    expected = _outputs(original, example_inputs)
    try:
        got = _outputs(small, example_inputs)
    except Exception as err:  # noqa: BLE001 - reported with its cause; the original model is untouched
        raise ValueError(f"shrink: the shrunk model does not run ({type(err).__name__}: {err}); the model's code "
                         "probably fixes a size (a hard-coded view or head count). The original model is unchanged") from err
    for a, b in zip(expected, got):
        if a.shape != b.shape or (a.is_floating_point() and not torch.allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(a.abs().max())))):
            raise ValueError("shrink: the shrunk model's outputs differ from the original's on `example_inputs`; "
                             "the original model is unchanged")
