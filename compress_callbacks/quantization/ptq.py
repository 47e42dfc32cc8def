"""Post-training quantization: specs from a float model and a few calibration batches.

``calibrate`` gives a float model the same form that ``QuantizationAwareTraining`` leaves after
``finalize`` (see :mod:`compress_callbacks.quantization.spec`): weights snapped to a per-channel
symmetric grid (BN-folded for a Conv that feeds a BatchNorm), input ranges from min/max over the
batches, and ``model.compress_qparams``. It is the no-training baseline for QAT, and a way to use
:mod:`compress_callbacks.export` without QAT. ``fake_quantized`` runs such a model as the
fake-quant model computes it (inputs quantized with the stored ranges), the reference that every
int8 backend is compared with.

>>> import torch, torch.nn as nn
>>> torch.manual_seed(0) and None
>>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
>>> batches = [torch.randn(8, 1, 6, 6) for _ in range(2)]
>>> model = calibrate(model.eval(), batches)
>>> sorted(model.compress_qparams), model.compress_qparams["0"].bn
(['0', '4'], '1')
>>> with torch.no_grad(), fake_quantized(model):
...     simulated = model(batches[0])
>>> bool((simulated - model(batches[0])).abs().max() < 0.1)
True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

from .._progress import check_progress, progress_bar
from ..targets import ModuleSpec, is_transformers_conv1d, unwrap_model
from . import fake_quant as FQ
from .config import QuantizationConfig
from .fast_path import fast_path_disabled, quantizable_modules, warn_left_out
from .grid import batchnorm_fold_factor, channel_view
from .observer import RangeObserver
from .spec import LayerQuantSpec, get_qparams, set_qparams

__all__ = ["calibrate", "fake_quantized"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _spec_for(module: nn.Module, bn: nn.Module | None, bn_name: str | None, weight_bits: int) -> LayerQuantSpec:
    weight = module.weight.detach().float()
    axis = 1 if is_transformers_conv1d(module) else 0  # Conv1D: [in, out], channels are the columns
    grid_weight = weight * channel_view(batchnorm_fold_factor(bn).to(weight.device), weight.dim()) if bn is not None else weight
    scale = FQ.per_channel_weight_scale(grid_weight.t() if axis else grid_weight, weight_bits)
    return LayerQuantSpec(weight_bits=weight_bits, weight_scale=scale.cpu(), bn=bn_name, weight_axis=axis)


def _snap_weight(module: nn.Module, spec: LayerQuantSpec, bn: nn.Module | None) -> None:
    """Store the weight on its grid, as QAT's ``finalize`` does (``q(w * f) / f`` for a folded conv)."""
    weight = module.weight.detach().float()
    if spec.weight_axis:
        on_grid = FQ.fake_quantize_weight(weight.t(), spec.weight_bits).t()
    elif bn is None:
        on_grid = FQ.fake_quantize_weight(weight, spec.weight_bits)
    else:
        on_grid = FQ.fold_bn_fake_quantize_weight(weight, batchnorm_fold_factor(bn).to(weight.device), spec.weight_bits)
    with torch.no_grad():
        module.weight.copy_(on_grid.to(module.weight.dtype))


def _first_tensor(args: Any) -> torch.Tensor | None:
    first = args[0] if isinstance(args, tuple) and args else args
    return first if isinstance(first, torch.Tensor) else None


def _observe(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[Any], progress: bool | None = None):
    """Run the batches once; return input ``(min, max)`` per layer that saw one and the conv -> BatchNorm edges."""
    observer = RangeObserver(len(layers))
    producer: dict[int, str] = {}
    conv_to_bn: dict[str, set[str]] = {}
    handles = []

    def on_input(slot):
        def hook(_module, args):
            x = _first_tensor(args)
            if x is not None:
                observer.observe(slot, x)
        return hook

    def on_conv_output(name):
        def hook(_module, _args, out):
            producer[id(out)] = name
        return hook

    def on_bn_input(name):
        def hook(_module, args):
            x = _first_tensor(args)
            if x is not None and id(x) in producer:
                conv_to_bn.setdefault(producer[id(x)], set()).add(name)
        return hook

    for slot, (name, module) in enumerate(layers.items()):
        handles.append(module.register_forward_pre_hook(on_input(slot)))
        if isinstance(module, _CONV_TYPES):
            handles.append(module.register_forward_hook(on_conv_output(name)))
    for name, module in model.named_modules():
        if isinstance(module, _BN_TYPES):
            handles.append(module.register_forward_pre_hook(on_bn_input(name)))
    count = 0
    try:
        with torch.no_grad(), fast_path_disabled():  # every layer's forward runs (see .fast_path)
            for batch in progress_bar(batches, progress, desc="calibrate"):
                producer.clear()
                if isinstance(batch, dict):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
                count += 1
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("`batches`: expected at least one calibration batch, got none")
    edges = {conv: next(iter(bns)) for conv, bns in conv_to_bn.items() if len(bns) == 1}
    seen = observer.seen.tolist()
    ranges = {name: (observer.observed_min[slot], observer.observed_max[slot])
              for slot, name in enumerate(layers) if seen[slot]}
    return ranges, edges


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    weight_bits: int = 8,
    activation_bits: int | None = 8,
    *,
    modules: ModuleSpec = None,
    exclude: ModuleSpec = None,
    fold_bn: bool = True,
    progress: bool | None = None,
) -> nn.Module:
    """Post-training quantization, in place: snap weights, record input ranges, attach the specs.

    ``batches``: an iterable of model inputs (a tensor, a tuple of positional arguments or a dict of
    keyword arguments). The model is run in eval mode. Weights: per output channel, symmetric,
    ``max|w|`` scales (zeros stay zero). Inputs: per tensor, affine uint8 over the observed min/max
    (``activation_bits=None``: weight-only). A Conv whose output is the input of a single BatchNorm
    is quantized BN-folded (``fold_bn=False`` turns that off). ``progress``: a tqdm bar over the
    batches (None: on a terminal only, True: always, False: never). Returns the (unwrapped) model.
    """
    check_progress(progress)
    config = QuantizationConfig(weight_bits=weight_bits, activation_bits=activation_bits, modules=modules, exclude=exclude)
    weight_bits, activation_bits = config.weight_bits, config.activation_bits
    root = unwrap_model(model)
    names, skipped = quantizable_modules(root, modules=config.modules, exclude=config.exclude)
    warn_left_out("calibrate", skipped, stacklevel=2)
    named = dict(root.named_modules())
    layers = {name: named[name] for name in names}
    was_training = root.training
    root.eval()
    try:
        ranges, edges = _observe(root, layers, batches, progress)
    finally:
        root.train(was_training)
    qparams = get_qparams(root)
    for name, module in layers.items():
        bn_name = edges.get(name) if fold_bn else None
        bn = named[bn_name] if bn_name is not None else None
        spec = _spec_for(module, bn, bn_name, weight_bits)
        if activation_bits is not None and name in ranges:
            low, high = ranges[name]
            scale, zero_point = FQ.activation_qparams(low, high, spec.activation_qmin, spec.activation_qmax)
            spec.activation_bits = activation_bits
            spec.input_scale, spec.input_zero_point = float(scale), int(zero_point)
        _snap_weight(module, spec, bn)
        qparams[name] = spec
    set_qparams(root, qparams)
    return root


@contextlib.contextmanager
def fake_quantized(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, each quantized layer's input is fake-quantized with its stored range (or per
    token, ``activation_scheme="dynamic"``).

    With weights already on their grid (a finalized or calibrated model), this is what the
    fake-quant model computes in eval: the reference for int8 backends.
    """
    root = unwrap_model(model)
    named = dict(root.named_modules())
    handles = []

    def hook_for(spec: LayerQuantSpec):
        def hook(_module, args):
            x = args[0]
            if spec.dynamic:  # a range per token, from the input itself
                return (FQ.fake_quantize_per_token(x),) + tuple(args[1:])
            q = torch.fake_quantize_per_tensor_affine(
                x.float(), spec.input_scale, spec.input_zero_point, spec.activation_qmin, spec.activation_qmax
            ).to(x.dtype)
            return (q,) + tuple(args[1:])
        return hook

    for name, spec in get_qparams(root).items():
        if not spec.weight_only:
            handles.append(named[name].register_forward_pre_hook(hook_for(spec)))
    try:
        with fast_path_disabled():  # a fused Transformer eval path would skip the hooked layers
            yield model
    finally:
        for handle in handles:
            handle.remove()
