"""``export_executorch`` for the LLM schemes: XNNPACK's dynamically quantized linears ("8da4w").

Layers trained with ``activation_scheme="dynamic"`` (per-token int8 inputs) get the torchao tensor
``to_torchao`` builds from the TRAINED codes (``IntxUnpackedToInt8Tensor`` with per-token activation
quantization, the layout of torchao's ``Int8DynamicActivationIntxWeightConfig``); the model is then
captured with ``torch.export`` and lowered with ``XnnpackPartitioner``, ExecuTorch's own Llama route.
XNNPACK recognises ``choose_qparams -> quantize -> dequantize`` on the input and ``dequantize_affine``
on the weight as one dynamically quantized linear (``qd8``):

=======================================================  =================================================
trained spec                                             in the program
=======================================================  =================================================
dynamic, 4-bit (or 2-3 bit) in groups of a multiple      ``qd8 x qbint4`` (codes of 2-3 bits held in int4)
of 32
dynamic, 2..8 bits per channel                           ``qd8 x qcint4`` (4 bits) or ``qd8 x qcint8``
dynamic, 5..8 bits in groups, groups not a multiple      float (XNNPACK has no kernel): the weights on
of 32; any weight-only spec; embeddings                  their grid, named in ``float_layers``
=======================================================  =================================================

XNNPACK's weight-only pattern (a dequantized weight, float input) is not run here: ExecuTorch 1.5
lowers it as a static int8 linear and computes wrong values. Static per-tensor specs belong to the
PT2E path of ``executorch.py``; a model mixing them with dynamic specs is refused, naming the layer.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
import torch.nn as nn

from ..quantization.ptq import fake_quantized
from ..quantization.spec import QPARAMS_ATTR, LayerQuantSpec, set_qparams
from .onnx_lm import _PositionalCall
from .torchao import to_torchao

#: XNNPACK's group-wise dynamic linear: 4-bit codes in groups of a multiple of this
XNNPACK_GROUP_MULTIPLE = 32


def uses_llm_path(spec: LayerQuantSpec) -> bool:
    """Whether a spec is one of the LLM schemes (per-token dynamic inputs, or weight scales in groups).

    >>> uses_llm_path(LayerQuantSpec(weight_bits=4, weight_scale=torch.ones(2, 1), weight_group_size=32))
    True
    """
    return spec.dynamic or spec.weight_group_size is not None


def llm_layer_scheme(name: str, spec: LayerQuantSpec) -> tuple[str, str]:
    """``("dynamic_int", how)`` for a spec XNNPACK runs as a dynamically quantized linear, else
    ``("float", why)``; ValueError for a static per-tensor spec (the other export path's).

    >>> llm_layer_scheme("fc", LayerQuantSpec(weight_bits=4, weight_scale=torch.ones(2, 2), weight_group_size=32,
    ...                                       activation_bits=8, activation_scheme="dynamic"))
    ('dynamic_int', 'int8 per token x int4 in groups of 32')
    >>> llm_layer_scheme("head", LayerQuantSpec(weight_bits=8, weight_scale=torch.ones(2, 2), weight_group_size=32,
    ...                                         activation_bits=8, activation_scheme="dynamic"))[1]
    'XNNPACK runs groups of 4-bit codes only (8-bit)'
    """
    group = spec.weight_group_size
    if not spec.weight_only and not spec.dynamic:
        raise ValueError(f"`model`: layer {name!r} has static per-tensor input ranges while other layers use the LLM "
                         "schemes (per-token dynamic inputs or group-wise weights): export_executorch runs one or the "
                         "other in a program; train every layer with activation_scheme='dynamic' or leave this one out")
    if spec.weight_only:
        return "float", "weight-only (XNNPACK has no weight-only integer linear)"
    if group is None:
        return "dynamic_int", f"int8 per token x int{4 if spec.weight_bits <= 4 else 8} per channel"
    if spec.weight_bits > 4:
        return "float", f"XNNPACK runs groups of 4-bit codes only ({spec.weight_bits}-bit)"
    if group % XNNPACK_GROUP_MULTIPLE:
        return "float", f"XNNPACK needs groups of a multiple of {XNNPACK_GROUP_MULTIPLE} (groups of {group})"
    return "dynamic_int", f"int8 per token x int4 in groups of {group}"


def _program_model(root: nn.Module, qparams: dict[str, LayerQuantSpec], schemes: dict[str, tuple[str, str]]) -> nn.Module:
    """A copy in which the ``dynamic_int`` layers hold torchao tensors of their trained codes; every
    other layer (and every embedding, whose lookup XNNPACK does not run) holds its float weight on the grid."""
    work = copy.deepcopy(root).cpu().float().eval()  # XNNPACK computes the float parts in float32
    work.__dict__.pop(QPARAMS_ATTR, None)
    for module in work.modules():
        if isinstance(module, nn.Embedding):  # untied from a quantized head: the lookup stays a float table
            module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=False)
    kept = {}
    for name, spec in qparams.items():
        if schemes[name][0] == "dynamic_int":
            # 2-3 bit codes in groups ride in XNNPACK's int4 container: the same codes (they lie on the grid)
            bits = 4 if spec.weight_group_size is not None else spec.weight_bits
            kept[name] = dataclasses.replace(spec, weight_bits=bits, tied_to=None)
    if kept:
        set_qparams(work, kept)
        to_torchao(work, inplace=True)
    return _PositionalCall(work).eval()


def _dynamic_shapes(inputs: tuple):
    """A symbolic sequence axis (dim 1 of integer inputs such as ``input_ids`` [batch, seq]) up to the
    example's length; None for float inputs (a feature axis) or a sequence shorter than 2."""
    lengths = {t.shape[1] for t in inputs if t.dim() == 2 and not t.is_floating_point()}
    if len(lengths) != 1 or min(lengths) < 2:
        return None
    sequence = torch.export.Dim("sequence", min=1, max=lengths.pop())
    # one entry: ``_PositionalCall.forward(*inputs)`` takes the inputs as one tuple argument
    return (tuple({1: sequence} if t.dim() == 2 and not t.is_floating_point() else None for t in inputs),)


def reference_outputs(root: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    """The fake-quant model's outputs (per-token input quantization, weights on their grid)."""
    model = copy.deepcopy(root).cpu().float().eval()
    try:
        with torch.no_grad(), fake_quantized(model):
            outputs = _PositionalCall(model)(*inputs)
    except Exception as error:
        raise ValueError(f"`example_inputs` do not match `model` ({type(error).__name__}: {error})") from error
    return [t for t in torch.utils._pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]


def lower_llm(root: nn.Module, inputs: tuple, qparams: dict[str, LayerQuantSpec]):
    """The lowered program, its ``.pte`` bytes and ``{layer: why}`` for the layers with a spec that run in float."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    schemes = {name: llm_layer_scheme(name, spec) for name, spec in qparams.items()}
    for name in schemes:
        if isinstance(root.get_submodule(name), nn.Embedding):
            schemes[name] = ("float", "an embedding: XNNPACK runs no lookup; its table is on the grid")
    model = _program_model(root, qparams, schemes)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=FutureWarning)  # pytree / LeafSpec deprecations inside ExecuTorch
        shapes = _dynamic_shapes(inputs)
        try:
            program = torch.export.export(model, inputs, dynamic_shapes=shapes) if shapes else torch.export.export(model, inputs)
        except Exception as error:  # a model whose graph fixes the sequence length: the example's shapes only
            program = torch.export.export(model, inputs)
            warnings.warn(f"export_executorch: the sequence axis could not be made symbolic ({type(error).__name__}); "
                          f"the program takes inputs of shapes {[tuple(t.shape) for t in inputs]} only", stacklevel=3)
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        data = edge.to_executorch().buffer
    return program, data, {name: why for name, (scheme, why) in sorted(schemes.items()) if scheme == "float"}
