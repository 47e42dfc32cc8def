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
from .quantized_graph import _require_finalized

__all__ = ["save_compressed", "load_compressed"]

_FORMAT = "compress_callbacks.compressed/1"
_KINDS = {"raw": ("values",), "float": ("values", "shape", "dtype"), "int8": ("values", "shape", "dtype"),
          "int8_bn": ("values", "shape", "dtype")}  # kind -> keys its entry must hold ("mask" optional)


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

    ``model`` must be finalized: a model that an attached ``CompressionManager`` still trains (or a copy
    carrying its live fake-quant layers) raises ``ValueError``, since its learned ranges are not in it
    yet. A plain float model without quantization specs (never quantized, or pruned and finalized) is
    saved too: its weights as floats, sparse ones without their zeros.
    """
    _require_finalized(model, "save_compressed")
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
    A file that is not a ``save_compressed`` file, or one that does not fit ``fresh_model`` (other
    keys or shapes), raises ``ValueError`` before ``fresh_model`` is touched.
    """
    where = f"`path`: {os.fspath(path)!r}"
    try:
        payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # not a torch file, or one holding more than tensors and plain values
        raise ValueError(f"{where} is not a save_compressed file ({type(error).__name__})") from error
    try:
        state, qparams = _decode_payload(payload)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        raise ValueError(f"{where} is not a save_compressed file, or a damaged one ({type(error).__name__}: {error})") from error
    root = unwrap_model(fresh_model)
    _require_fit(root, state, qparams, where)
    # a folded conv's weight is stored as codes * scale / bn_factor: needs the BN's loaded statistics
    for key, spec in _folded_weights(payload, qparams).items():
        bn_state = {k.removeprefix(spec.bn + "."): v for k, v in state.items() if k.startswith(spec.bn + ".")}
        bn = copy.deepcopy(root.get_submodule(spec.bn))
        bn.load_state_dict(bn_state)
        factor = channel_view(batchnorm_fold_factor(bn), state[key].dim())
        state[key] = (state[key].float() / factor).to(state[key].dtype)  # as QAT's finalize: q(w f) / f
    root.load_state_dict(state, strict=True)
    set_qparams(root, qparams)
    return fresh_model


def _decode_payload(payload: Any) -> tuple[dict[str, torch.Tensor], dict[str, LayerQuantSpec]]:
    """The state dict and specs a file holds (raises KeyError / TypeError / ValueError when it is not one)."""
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"no {_FORMAT!r} format tag")
    qparams = qparams_from_state(payload["qparams"])
    weight_specs = {f"{name}.weight": spec for name, spec in qparams.items()}
    state = {}
    for key, entry in payload["tensors"].items():
        kind = entry["kind"]
        if kind not in _KINDS:
            raise ValueError(f"entry {key!r} has unknown kind {kind!r}")
        missing = [k for k in _KINDS[kind] if k not in entry]
        if missing:
            raise KeyError(f"entry {key!r} lacks {missing}")
        if kind == "raw":
            if not torch.is_tensor(entry["values"]):
                raise TypeError(f"entry {key!r} holds a {type(entry['values']).__name__}, not a tensor")
            state[key] = entry["values"]
            continue
        dtype = getattr(torch, str(entry["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"entry {key!r} has unknown dtype {entry['dtype']!r}")
        tensor = _unpack_tensor(entry)
        if kind in ("int8", "int8_bn"):
            if key not in weight_specs:
                raise KeyError(f"entry {key!r} is int8 without a spec")
            tensor = dequantized_weight(tensor, weight_specs[key])
        state[key] = tensor.to(dtype)
    return state, qparams


def _folded_weights(payload: dict[str, Any], qparams: dict[str, LayerQuantSpec]) -> dict[str, LayerQuantSpec]:
    return {f"{name}.weight": spec for name, spec in qparams.items()
            if payload["tensors"].get(f"{name}.weight", {}).get("kind") == "int8_bn"}


def _require_fit(root: nn.Module, state: dict[str, torch.Tensor], qparams: dict[str, LayerQuantSpec], where: str) -> None:
    """Raise ValueError unless ``state`` and ``qparams`` load into ``root`` exactly (strict keys, same shapes)."""
    expected = root.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} here"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    modules = dict(root.named_modules())
    specs = [name for name, spec in qparams.items()
             if not isinstance(getattr(modules.get(name), "weight", None), torch.Tensor)
             or (spec.bn is not None and not isinstance(modules.get(spec.bn), nn.modules.batchnorm._BatchNorm))]
    problems = [f"{label}: {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}"
                for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("other shapes", shapes), ("specs of modules it lacks", specs)) if items]
    if problems:
        raise ValueError(f"{where} does not fit `fresh_model` ({type(root).__name__}): {'; '.join(problems)}; "
                         "nothing was loaded")
