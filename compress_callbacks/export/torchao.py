"""``to_torchao``: the finalized model with torchao quantized weights holding the trained codes.

Each quantized ``nn.Linear`` (and ``nn.Embedding``) of a finalized model gets, in place of its float
weight, the torchao tensor subclass that torchao's own config for the trained scheme produces, built
from the codes and scales training used (never re-quantized, so no code can round differently):

=================================================  ===========================================  =================================================
trained scheme (``LayerQuantSpec``)                torchao tensor                               the torchao config that makes the same tensor
=================================================  ===========================================  =================================================
weight-only, 8 bits, one scale per output channel  ``Int8Tensor`` (per row)                     ``Int8WeightOnlyConfig()``
weight-only, 2-7 bits or in groups                 ``IntxUnpackedToInt8Tensor``                 ``IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))``
dynamic per-token int8 activations                 ``IntxUnpackedToInt8Tensor`` (per-token      ``Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, ...)``
                                                   activation quantization)                     ("8da4w")
=================================================  ===========================================  =================================================

Static per-tensor input ranges (the CNN/MLP scheme) are refused, naming the layer: torchao's static
int8 tensor fixes the rank of the input it accepts; ``to_int8`` and ``export_executorch`` run them.

>>> import torch, torch.nn as nn
>>> from compress_callbacks.quantization.spec import LayerQuantSpec, set_qparams
>>> model = nn.Sequential(nn.Linear(4, 2, bias=False))
>>> with torch.no_grad():
...     _ = model[0].weight.copy_(torch.tensor([[0.4, -0.25, 0.0, 1.0], [2.0, 0.0, -2.0, 0.5]]))
>>> set_qparams(model, {"0": LayerQuantSpec(weight_bits=4, weight_scale=torch.tensor([1 / 7, 2 / 7]))})
>>> converted = to_torchao(model)
>>> type(converted[0].weight).__name__, converted[0].weight.qdata.tolist()
('IntxUnpackedToInt8Tensor', [[3, -2, 0, 7], [7, 0, -7, 2]])
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from ..quantization.spec import QPARAMS_ATTR, LayerQuantSpec, quantize_weight
from ..targets import transformers_conv1d_class, unwrap_model
from .quantized_graph import _require_qparams

__all__ = ["to_torchao", "torchao_scheme"]

_SUPPORTED = (nn.Linear, nn.Embedding)


@dataclass(frozen=True)
class _Plan:
    """How one layer becomes torchao: the scheme's name and the function that builds its weight tensor."""

    scheme: str
    build: Callable[[torch.Tensor], torch.Tensor]
    config: Callable[[], Any]  # the torchao config of the same scheme (what Transformers records to reload it)


def torchao_scheme(spec: LayerQuantSpec) -> str:
    """The torchao scheme that runs ``spec``: ``"int8_weight_only"``, ``"intx_weight_only"`` or
    ``"int8_dynamic_activation_intx_weight"``; ValueError (without a layer name) for one torchao cannot run.

    >>> torchao_scheme(LayerQuantSpec(weight_bits=8, weight_scale=torch.ones(2)))
    'int8_weight_only'
    >>> torchao_scheme(LayerQuantSpec(weight_bits=4, weight_scale=torch.ones(2)))
    'intx_weight_only'
    """
    grouped = _group_size(spec) is not None
    dynamic = getattr(spec, "activation_scheme", "static") == "dynamic"
    if dynamic:
        return "int8_dynamic_activation_intx_weight"
    if not spec.weight_only:
        raise ValueError(
            f"it was trained with static per-tensor {spec.activation_bits}-bit input ranges, which torchao's "
            "quantized tensors do not run for inputs of any rank; convert it with to_int8 or export_executorch, "
            "or train it with activation_scheme='dynamic' (per-token ranges, what torchao runs)"
        )
    return "intx_weight_only" if grouped or spec.weight_bits != 8 else "int8_weight_only"


def _group_size(spec: LayerQuantSpec) -> int | None:
    return getattr(spec, "weight_group_size", None)


def _scales_2d(spec: LayerQuantSpec, out_features: int) -> torch.Tensor:
    """The spec's weight scales as ``[out, groups]`` (one group per row for per-channel scales)."""
    scale = spec.weight_scale.detach().float()
    return scale.reshape(out_features, -1)


def _plan(name: str, module: nn.Module, spec: LayerQuantSpec) -> _Plan:
    """Check one layer and say how it converts (nothing is built yet)."""
    conv1d = transformers_conv1d_class()
    if (conv1d is not None and isinstance(module, conv1d)) or spec.weight_axis != 0:
        raise ValueError(f"to_torchao: layer {name!r} is a Transformers Conv1D ([in, out] weight), which calls addmm, not "
                         "F.linear: torchao's quantized tensors do not serve it; use to_int8 or export_onnx")
    if not isinstance(module, _SUPPORTED):
        raise ValueError(f"to_torchao: layer {name!r} is a {type(module).__name__}; torchao's quantized tensors are made "
                         "for Linear and Embedding layers here; convert convolutional models with to_int8 or export_executorch")
    if spec.bn is not None:
        raise ValueError(f"to_torchao: layer {name!r} has the BatchNorm {spec.bn!r} folded into it; use to_int8 or export_executorch")
    try:
        scheme = torchao_scheme(spec)
    except ValueError as error:
        raise ValueError(f"to_torchao: layer {name!r}: {error}") from None
    weight = module.weight
    out_features, in_features = weight.shape
    group = _group_size(spec) or in_features
    scales = _scales_2d(spec, out_features)
    if in_features % group or scales.shape[1] != in_features // group:
        raise ValueError(f"to_torchao: layer {name!r}: {scales.numel()} weight scales do not fit a [{out_features}, "
                         f"{in_features}] weight in groups of {group}")
    if isinstance(module, nn.Embedding) and scheme == "int8_dynamic_activation_intx_weight":
        raise ValueError(f"to_torchao: layer {name!r} is an Embedding: its input is token ids, which have no activation range")
    bits, block = spec.weight_bits, [1, group]

    # Int8Tensor serves F.linear; an embedding (or a weight tied to one) gets the tensor that serves F.embedding too
    int8_tensor = scheme == "int8_weight_only" and not isinstance(module, nn.Embedding) and not _shares_weight(spec)

    def build(w: torch.Tensor) -> torch.Tensor:
        codes = quantize_weight(w, spec)  # the fake-quant codes (per channel or per group)
        dtype = w.dtype
        if int8_tensor:
            from torchao.quantization.quantize_.workflows import Int8Tensor

            return Int8Tensor(codes, scales.clone(), block, dtype)
        from torchao.quantization.quantize_.workflows import IntxUnpackedToInt8Tensor
        from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
            IntxUnpackedToInt8TensorActivationQuantization as ActivationQuantization,
        )

        activation = ActivationQuantization.INT8_ASYM_PER_TOKEN if scheme == "int8_dynamic_activation_intx_weight" else None
        return IntxUnpackedToInt8Tensor(codes, scales.clone(), torch.zeros(scales.shape, dtype=torch.int8), _int_dtype(bits),
                                        block, dtype, activation)

    def config() -> Any:
        from torchao.quantization import (
            Int8DynamicActivationIntxWeightConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
            PerAxis,
            PerGroup,
        )

        granularity = PerGroup(group) if _group_size(spec) is not None else PerAxis(0)
        if int8_tensor:
            return Int8WeightOnlyConfig()
        if scheme in ("int8_weight_only", "intx_weight_only"):
            return IntxWeightOnlyConfig(weight_dtype=_int_dtype(bits), granularity=granularity)
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=_int_dtype(bits), weight_granularity=granularity)

    return _Plan(scheme, build, config)


def _shares_weight(spec: LayerQuantSpec) -> bool:
    return getattr(spec, "tied_to", None) is not None


def _int_dtype(bits: int) -> torch.dtype:
    return getattr(torch, f"int{bits}")


def to_torchao(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """``model`` (finalized) with each quantized Linear / Embedding holding a torchao quantized weight.

    The tensors hold the codes training produced (``round(w / scale)`` on the trained scales) and run
    what was trained: weight-only layers dequantize their int codes, "8da4w" layers quantize each
    token of their input to int8 at run time as torchao's ``Int8DynamicActivationIntxWeightConfig``
    does. The model runs eagerly and under ``torch.compile``; a Transformers model keeps
    ``generate()``. An embedding and LM head tied and quantized once in training share one torchao
    tensor. Every layer is checked before any is converted: a model not finalized, a layer torchao
    cannot run (static input ranges, a folded BatchNorm, a Conv / Transformers Conv1D) raises
    ``ValueError`` naming it, with nothing changed. ``inplace=False`` (default) converts a deep copy.
    The specs (``compress_qparams``) are not carried over: the weights are no longer float.

    >>> import torch, torch.nn as nn
    >>> from compress_callbacks import CompressionManager, QuantizationAwareTraining
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    >>> manager = CompressionManager(QuantizationAwareTraining(start_step=0, weight_bits=4, activation_bits=None))
    >>> manager.attach(model, optimizer)
    >>> model(torch.randn(4, 8)).sum().backward(); optimizer.step()
    >>> finalized = manager.finalize(model)
    >>> converted = to_torchao(finalized)
    >>> x = torch.randn(3, 8)
    >>> torch.allclose(converted(x), finalized(x), atol=1e-6)    # weight-only: the finalized weights are on the grid
    True
    """
    qparams = _require_qparams(model, "to_torchao")
    root = unwrap_model(model)
    plans = {name: _plan(name, root.get_submodule(name), spec) for name, spec in qparams.items()}
    _refuse_shared_weights(root, plans, qparams)
    _require_torchao()
    target = root if inplace else copy.deepcopy(root)
    built = {}  # all built, then set; a tied weight once, from the layer that runs it as a Linear
    for name in sorted(plans, key=lambda n: isinstance(target.get_submodule(n), nn.Embedding)):
        weight = target.get_submodule(name).weight
        if id(weight) not in built:
            built[id(weight)] = (weight, nn.Parameter(plans[name].build(weight), requires_grad=False))
    for name in plans:
        module = target.get_submodule(name)
        module.weight = built[id(module.weight)][1]
    target.__dict__.pop(QPARAMS_ATTR, None)
    _record_for_transformers(target, plans)
    return target


def _record_for_transformers(model: nn.Module, plans: dict[str, _Plan]) -> None:
    """A Transformers model records its torchao configs (``config.quantization_config``) and gets the
    torchao quantizer Transformers attaches when it loads one, so ``save_pretrained`` writes the
    quantized tensors (flattened for safetensors) and ``from_pretrained`` reads them back."""
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        return
    from torchao.quantization import FqnToConfig
    from transformers import TorchAoConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    configs = {name: plan.config() for name, plan in plans.items()}
    distinct = {repr(c) for c in configs.values()}
    quant_type = next(iter(configs.values())) if len(distinct) == 1 else FqnToConfig(dict(configs))
    quantizer = AutoHfQuantizer.from_config(TorchAoConfig(quant_type=quant_type), pre_quantized=True)
    model.hf_quantizer = quantizer
    model.config.quantization_config = quantizer.quantization_config


def _refuse_shared_weights(root: nn.Module, plans: dict[str, Any], qparams: dict[str, LayerQuantSpec]) -> None:
    """A weight shared by two modules converts once, for both: QAT quantized it once (the later layer's
    spec names the first in ``tied_to``, an LM head tied to its embedding); any other sharing is refused."""
    owners: dict[int, dict[int, str]] = {}  # weight -> {module: its first name}: one module under two names is one owner
    for name, module in root.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners.setdefault(id(weight), {}).setdefault(id(module), name)
    for name in plans:
        module = root.get_submodule(name)
        others = [n for key, n in owners.get(id(module.weight), {}).items() if key != id(module)]
        tied = {getattr(qparams[name], "tied_to", None)} | {n for n in others if getattr(qparams.get(n), "tied_to", None) == name}
        others = [n for n in others if n not in tied]
        if others:
            raise ValueError(
                f"to_torchao: layer {name!r} shares its weight with {others} (tied weights), which QAT did not quantize "
                "as one: name both in `modules` when training (they then share one grid), untie them "
                "(e.g. `config.tie_word_embeddings=False`) or leave the layer out"
            )


def _require_torchao() -> None:
    try:
        import torchao  # noqa: F401
    except ImportError as error:  # pragma: no cover - torchao is in the test extras
        raise ImportError("to_torchao needs torchao: pip install 'compress-callbacks[export]' (torchao>=0.18)") from error
