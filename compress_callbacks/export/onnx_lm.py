"""ONNX export of Transformers models (causal LMs): ``torch.export`` with dynamic batch and sequence axes.

The TorchScript exporter that serves CNNs and MLPs (:mod:`.onnx_export`) fixes every dimension but
the batch to the example's and has no ONNX op for some of what Transformers computes (``aten::diff``
when no ``attention_mask`` is given). A ``PreTrainedModel`` is exported here instead: its quantized
layers become ``Int8Layer`` (``quantized_decomposed`` quantize / dequantize ops on the trained int8
codes, which the dynamo exporter writes as ``QuantizeLinear`` / ``DequantizeLinear`` on int8
initializers), and ``torch.onnx.export(..., dynamo=True, dynamic_shapes=...)`` traces it with both
the batch and the sequence axis symbolic. The model is called as ``model(*inputs, use_cache=False)``:
the graph computes the logits of the whole sequence, without a key/value cache.

>>> import torch
>>> _traceable_example((torch.tensor([[5]]), torch.tensor([[1]])))   # size-1 axes would be traced as constants
(tensor([[5, 5],
        [5, 5]]), tensor([[1, 1],
        [1, 1]]))
"""

from __future__ import annotations

import inspect
import sys
import warnings

import torch
import torch.nn as nn

from ..quantization.spec import get_qparams
from ..targets import unwrap_model
from .inductor import _int8_layers_copy
from .onnx_nbits import _pack_low_bit_matmuls
from .ort import _output_template

__all__: list[str] = []  # internal to compress_callbacks.export

LM_OPSET = 18  # the opset torchlib writes; converting its graphs down to 17 fails (Squeeze/Unsqueeze axes)
DYNAMIC_AXES = ("batch", "sequence")  # the names of dims 0 and 1 of every input in the file


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` (unwrapped) is a Transformers ``PreTrainedModel`` (transformers is not imported here)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(unwrap_model(model), transformers.PreTrainedModel)


def check_token_inputs(inputs: tuple) -> None:
    """A Transformers model is exported for ``input_ids`` and, optionally, ``attention_mask``: one or two
    2-D ``[batch, sequence]`` tensors of one shape, the first of integer token ids."""
    shapes = [tuple(t.shape) for t in inputs]
    if (not 1 <= len(inputs) <= 2 or any(t.dim() != 2 for t in inputs) or len(set(shapes)) != 1
            or inputs[0].is_floating_point() or inputs[0].is_complex()):
        raise ValueError(
            "`example_inputs` of a Transformers model must be `input_ids` or `(input_ids, attention_mask)`: 2-D "
            f"[batch, sequence] tensors of one shape, integer token ids first; got shapes {shapes} "
            f"({', '.join(str(t.dtype).removeprefix('torch.') for t in inputs)}). Another model (pixel inputs, more "
            "arguments): wrap it in an nn.Module taking tensors, exported with a dynamic batch axis only"
        )


class _PositionalCall(nn.Module):
    """``model(*inputs, use_cache=False)`` (``use_cache`` only where ``forward`` takes it): full-sequence logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        takes_cache = "use_cache" in inspect.signature(model.forward).parameters
        self.call_kwargs = {"use_cache": False} if takes_cache else {}

    def forward(self, *inputs: torch.Tensor):
        return self.model(*inputs, **self.call_kwargs)


def _traceable_example(inputs: tuple) -> tuple:
    """``inputs`` repeated along the batch and sequence axes until each is at least 2 long.

    ``torch.export`` specializes a dimension of size 1 to a constant, which would fix it in the file.
    Repeating the example changes none of the computation the graph records.
    """
    batch, sequence = inputs[0].shape
    return tuple(t.repeat(2 if batch < 2 else 1, 2 if sequence < 2 else 1) for t in inputs)


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost exception of a chain (what the exporter's long report is about)."""
    while error.__cause__ is not None and error.__cause__ is not error:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def language_model_onnx(model: nn.Module, inputs: tuple):
    """The Q/DQ ONNX model (``ModelProto``, opset 18) of a finalized Transformers model, and its output template.

    Graph inputs ``input_0`` (``input_ids``) and ``input_1`` (``attention_mask``, if given), both
    ``[batch, sequence]`` with symbolic dims; outputs ``output_<i>`` (the logits: ``[batch, sequence,
    vocab]``). Weights are the int8 codes of the specs (per-channel scales, ``DequantizeLinear`` on
    axis 0; group-wise codes one row per group, reshaped back; Linears of 4 bits or fewer packed two codes
    a byte in ``MatMulNBits``, see :mod:`.onnx_nbits`), each quantized layer's input ``QuantizeLinear`` /
    ``DequantizeLinear`` with its learned scale and zero point, or, for a dynamic spec, the per-token
    range computed at run time in plain ops (``ReduceMin`` / ``ReduceMax`` / ``Round`` / ``Clip``, the
    same arithmetic as training). Raises ``RuntimeError`` with a one-line cause when ``torch.export`` or the
    ONNX translation fails.
    """
    check_token_inputs(inputs)
    graph_model = _PositionalCall(_int8_layers_copy(model)).eval()
    with torch.no_grad():
        outputs = graph_model(*inputs)
    template, n_out = _output_template(outputs)
    axes = {dim: torch.export.Dim(name) for dim, name in enumerate(DYNAMIC_AXES)}
    input_names = [f"input_{i}" for i in range(len(inputs))]
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's notes on axis names, pytree deprecations, ...
            program = torch.onnx.export(
                graph_model,
                _traceable_example(inputs),
                dynamo=True,
                dynamic_shapes=(tuple(axes for _ in inputs),),
                input_names=input_names,
                output_names=[f"output_{i}" for i in range(n_out)],
                opset_version=LM_OPSET,
                optimize=True,
                verbose=False,
                report=False,
            )
    except Exception as error:
        raise RuntimeError(
            f"ONNX export of {type(unwrap_model(model)).__name__} with dynamic batch and sequence axes failed: "
            f"{_root_cause(error)}"
        ) from None
    onnx_model = program.model_proto
    for node in onnx_model.graph.node:  # the exporter's stack traces and class names: most of a small model's file,
        del node.metadata_props[:]  # and paths of the machine it was exported on
    low_bit = {f"model.{name}.codes": spec for name, spec in get_qparams(unwrap_model(model)).items() if spec.weight_bits <= 4}
    unpacked = set(low_bit) - set(_pack_low_bit_matmuls(onnx_model, low_bit))
    if unpacked:
        warnings.warn(f"export_onnx: {len(unpacked)} layer(s) of 4 bits or fewer are stored as int8 codes (not a MatMul "
                      f"ONNX Runtime's MatMulNBits takes): {', '.join(sorted(unpacked)[:4])}", stacklevel=4)
    if len(onnx_model.graph.output) != n_out:
        template = None
    return onnx_model, template

