"""Compact checkpoints: int8 codes + scales for quantized weights, sparse tensors without their zeros.

>>> import os, tempfile, torch, torch.nn as nn
>>> from compress_callbacks.quantization.ptq import calibrate
>>> torch.manual_seed(0) and None
>>> model = calibrate(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval(), [torch.randn(64, 16)])
>>> path = os.path.join(tempfile.mkdtemp(), "model.ccz")
>>> save_compressed(model, path)
>>> fresh = load_compressed(path, nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)))
>>> x = torch.randn(8, 16)
>>> torch.equal(fresh(x), model(x)), sorted(fresh.compress_qparams)
(True, ['0', '2'])
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quantization.grid import batchnorm_fold_factor, channel_view
from ..quantization.spec import (
    LayerQuantSpec,
    dequantized_weight,
    get_qparams,
    qparams_from_state,
    qparams_to_state,
    quantize_weight,
    set_qparams,
)
from ..targets import unwrap_model

__all__ = ["save_compressed", "load_compressed"]

_FORMAT = "compress_callbacks.compressed/1"


def _pack_tensor(tensor: torch.Tensor, spec: LayerQuantSpec | None) -> dict[str, Any]:
    """int8 codes (if spec) and/or sparse storage (bitmask + non-zero values) for one weight."""
    tensor = tensor.detach().cpu()
    entry: dict[str, Any] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
    values = quantize_weight(tensor, spec) if spec is not None else tensor
    if spec is not None and spec.bn is None:
        entry["kind"] = "int8"
    elif spec is not None:
        entry["kind"] = "int8_bn"  # codes of the folded weight; stored weight = codes * scale / factor
    else:
        entry["kind"] = "float"
    flat = values.reshape(-1)
    nonzero = flat != 0
    if int(nonzero.sum()) * 8 < flat.numel() * 7:  # sparse storage pays off once >1/8 zeros
        entry["mask"] = _pack_bits(nonzero)
        entry["values"] = flat[nonzero].clone()
    else:
        entry["values"] = values.clone()
    return entry


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    padded = F.pad(mask.to(torch.uint8), (0, (-mask.numel()) % 8)).reshape(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (padded * weights).sum(dim=1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    bits = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1)[:numel].bool()


def _unpack_tensor(entry: dict[str, Any]) -> torch.Tensor:
    shape = entry["shape"]
    values = entry["values"]
    if "mask" in entry:
        numel = 1
        for size in shape:
            numel *= size
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[_unpack_bits(entry["mask"], numel)] = values
        values = dense
    return values.reshape(shape)


def save_compressed(model: nn.Module, path: str | os.PathLike) -> None:
    """Write a compact checkpoint: int8 codes + scales for quantized weights, sparse tensors without zeros.

    A weight with more than 1/8 zeros is stored as a bitmask and its non-zero values. Other entries of
    the ``state_dict`` are stored as they are. The file is a ``torch.save`` of plain tensors and dicts
    (loadable with ``weights_only=True``).
    """
    root = unwrap_model(model)
    qparams = get_qparams(root)
    state = root.state_dict()
    weight_specs = {f"{name}.weight": spec for name, spec in qparams.items()}
    tensors = {}
    for key, tensor in state.items():
        spec = weight_specs.get(key)
        if spec is not None and spec.bn is not None:
            factor = batchnorm_fold_factor(root.get_submodule(spec.bn)).cpu()
            tensor = tensor.detach().cpu().float() * channel_view(factor, tensor.dim())
        tensors[key] = _pack_tensor(tensor, spec) if tensor.is_floating_point() else {"values": tensor.detach().cpu().clone(), "kind": "raw"}
    torch.save({"format": _FORMAT, "tensors": tensors, "qparams": qparams_to_state(qparams)}, os.fspath(path))


def load_compressed(path: str | os.PathLike, fresh_model: nn.Module) -> nn.Module:
    """Load a ``save_compressed`` file into ``fresh_model`` (same architecture), strictly; returns it.

    The result computes the same float outputs as the saved model and carries its ``compress_qparams``.
    """
    payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"`path`: {os.fspath(path)!r} is not a save_compressed file")
    root = unwrap_model(fresh_model)
    qparams = qparams_from_state(payload["qparams"])
    weight_specs = {f"{name}.weight": spec for name, spec in qparams.items()}
    state = {}
    for key, entry in payload["tensors"].items():
        if entry["kind"] == "raw":
            state[key] = entry["values"]
            continue
        tensor = _unpack_tensor(entry)
        if entry["kind"] in ("int8", "int8_bn"):
            tensor = dequantized_weight(tensor, weight_specs[key])
        state[key] = tensor.to(getattr(torch, entry["dtype"]))
    # a folded conv's weight is stored as codes * scale / bn_factor: needs the BN's loaded statistics
    for key, entry in payload["tensors"].items():
        if entry["kind"] == "int8_bn":
            spec = weight_specs[key]
            bn_state = {k.removeprefix(spec.bn + "."): v for k, v in state.items() if k.startswith(spec.bn + ".")}
            bn = copy.deepcopy(root.get_submodule(spec.bn))
            bn.load_state_dict(bn_state)
            factor = channel_view(batchnorm_fold_factor(bn), state[key].dim())
            state[key] = (state[key].float() / factor).to(state[key].dtype)  # as QAT's finalize: q(w f) / f
    root.load_state_dict(state, strict=True)
    set_qparams(root, qparams)
    return fresh_model
