"""The Inductor int8 path: layers over int8 codes in the quantize/dequantize form Inductor lowers.

``to_int8(model, example_inputs=..., backend="inductor")`` builds an :class:`InductorInt8Module`
around a copy of the model made of :class:`Int8Layer`; under ``torch.compile`` with
``freezing=True`` Inductor's x86 passes fuse each into oneDNN ``qlinear`` / ``qconv``.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn as nn

from ..quantization.fake_quant import per_token_quantize_dequantize
from ..quantization.spec import LayerQuantSpec, quantize_weight
from .quantized_graph import FakeQuantLayer, _float32_inputs, _set_submodule, layer_forward, quantized_copy

__all__ = ["Int8Layer", "InductorInt8Module"]


class Int8Layer(nn.Module):
    """A Linear/Conv over int8 weight codes, in the quantize/dequantize form Inductor lowers to int8 kernels.

    >>> spec = LayerQuantSpec(weight_bits=8, weight_scale=torch.tensor([0.01]))
    >>> layer = nn.Linear(2, 1, bias=False)
    >>> layer.weight.data = torch.tensor([[0.5, -0.25]])
    >>> int8 = Int8Layer(FakeQuantLayer(layer, spec))
    >>> int8.codes.tolist(), int8(torch.tensor([[2.0, 4.0]])).tolist()
    ([[50, -25]], [[0.0]])

    The input is quantized/dequantized per tensor with the learned range (per token at run time for a
    dynamic spec; skipped when weight-only), the weight dequantized per channel from its int8 codes (per
    group: ``codes`` holds one row per group of ``weight_group_size`` inputs); under ``torch.compile`` with
    ``freezing=True`` Inductor's x86 passes fuse the pattern into oneDNN ``qlinear`` / ``qconv``.
    Eager, it computes the fake-quant layer (slowly).
    """

    def __init__(self, fake_quant: FakeQuantLayer):
        super().__init__()
        import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)

        layer, spec = fake_quant.layer, fake_quant.spec
        self.spec = spec
        codes = quantize_weight(layer.weight.detach(), spec)
        self.weight_shape = tuple(codes.shape)
        group_size = spec.weight_group_size
        self.register_buffer("codes", codes if group_size is None else codes.reshape(-1, group_size))  # a row per group
        self.register_buffer("weight_scale", fake_quant.weight_scale.clone())
        self.register_buffer("weight_zero_point", torch.zeros_like(fake_quant.weight_zero_point, dtype=torch.int64))
        bias = getattr(layer, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.template = copy.copy(layer)  # keeps stride / padding / padding_idx ... ; its weight is not used
        self.template._parameters = dict.fromkeys(layer._parameters)  # None: read as absent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        spec = self.spec
        if spec.dynamic:
            x = per_token_quantize_dequantize(x)
        elif not spec.weight_only:
            args = (spec.input_scale, spec.input_zero_point, spec.activation_qmin, spec.activation_qmax, torch.uint8)
            x = ops.dequantize_per_tensor.default(ops.quantize_per_tensor.default(x, *args), *args)
        weight = ops.dequantize_per_channel.default(
            self.codes, self.weight_scale, self.weight_zero_point, 0, -128, 127, torch.int8
        )
        if self.spec.weight_group_size is not None:  # (per channel no reshape: Inductor's int8 patterns match dq -> linear)
            weight = weight.reshape(self.weight_shape)
        return layer_forward(self.template, x, weight, self.bias)


def _call_module(module: nn.Module, *inputs):
    return module(*inputs)


class InductorInt8Module(nn.Module):
    """``torch.compile`` (Inductor, ``freezing=True``) of a model made of ``Int8Layer``; runs under ``no_grad``.

    >>> InductorInt8Module(nn.Identity()).graph_model
    Identity()

    Compiles on the first call for each new input shape (tens of seconds), so build it with
    ``to_int8(..., backend="inductor")``, which makes that first call on ``example_inputs``.

    Each instance compiles its own copy of a small function. Compiling the module itself would file
    every converted model under code that all compiled modules share, and after
    ``torch._dynamo.config.recompile_limit`` (8) of them Dynamo silently runs the rest, and the
    user's own compiled modules, in eager mode (several times slower than fp32 here).
    """

    def __init__(self, graph_model: nn.Module):
        super().__init__()
        self.graph_model = graph_model
        code = _call_module.__code__.replace()  # a code object of this instance's own: its own Dynamo cache
        self._forward = torch.compile(types.FunctionType(code, _call_module.__globals__, "int8_forward"))

    def forward(self, *inputs):
        import torch._inductor.config as inductor_config

        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self._forward(self.graph_model, *_float32_inputs(inputs))  # the graph is float32 (quantized_copy)


def _int8_layers_copy(model: nn.Module) -> nn.Module:
    root = quantized_copy(model)
    for name, module in list(root.named_modules()):
        if isinstance(module, FakeQuantLayer):
            _set_submodule(root, name, Int8Layer(module))
    return root

