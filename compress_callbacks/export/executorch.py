"""``export_executorch``: an ExecuTorch ``.pte`` program on the XNNPACK backend that keeps what QAT learned.

The float graph (BatchNorms folded as trained, weights on their learned grid) is captured with
``torch.export`` and annotated by ExecuTorch's ``XNNPACKQuantizer`` (torchao PT2E). Its observers are
then pinned to the specs instead of being calibrated: per-channel weight scales from
``weight_scale`` (the int8 codes are the fake-quant codes), and each layer's learned input range at
the quantization point that feeds that layer (uint8 ``[0, 255]`` becomes int8 ``[-128, 127]``, the
same grid). Points that XNNPACK quantizes but training never observed (op outputs: the last layer's,
an ``Add``'s, a global pooling's) are calibrated, and named. The program is lowered with
``XnnpackPartitioner``, written atomically and run once through ``executorch.runtime`` against the
fake-quant model (the parity gate). Needs ``pip install "compress-callbacks[edge]"``.

``ExecuTorchModule`` runs a written program behind an ``nn.Module`` (its example shows both).
"""

from __future__ import annotations

import copy
import functools
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn as nn

from .._progress import StageBar, progress_bar
from ..quantization.fake_quant import activation_qparams
from ..quantization.observer import RangeObserver
from ..quantization.qat import STATE_ATTR
from ..quantization.spec import LayerQuantSpec, get_qparams
from ..targets import unwrap_model
from .ort import _as_calibration_batch, _calibration_batches
from .executorch_llm import llm_layer_scheme, lower_llm, reference_outputs, uses_llm_path
from .quantized_graph import FakeQuantLayer, _as_tuple, _set_submodule, quantized_copy

__all__ = ["export_executorch", "ExecuTorchExport", "ExecuTorchModule", "DEFAULT_TOLERANCE"]

#: default ``tolerance``: largest |program - fake-quant model| as a fraction of the output's range
DEFAULT_TOLERANCE = 0.02
#: XNNPACK's static int8 grid (signed activations; restricted symmetric weights)
INT8_MIN, INT8_MAX = -128, 127
EDGE_EXTRA = 'pip install "compress-callbacks[edge]"'

_LAYER_OPS = ("linear.default", "conv1d.default", "conv2d.default", "conv3d.default", "convolution.default")
# ops whose output XNNPACK's quantizer makes share its input's range, but whose values are not a
# subset of the input's (an average): they get a range of their own, so the learned range of the
# layer they feed applies there, and their input's range is not narrowed to it
_AVERAGING_OPS = ("adaptive_avg_pool2d.default", "mean.dim", "mean.default")


@dataclass
class ExecuTorchExport:
    """What ``export_executorch`` wrote, and how closely the program computes the fake-quant model.

    >>> ExecuTorchExport(path="m.pte", size_bytes=1024, max_error=0.004, argmax_agreement=1.0)
    ExecuTorchExport(path='m.pte', size_bytes=1024, max_error=0.004, argmax_agreement=1.0, float_layers=[], calibrated_points=[])

    ``max_error``: the largest absolute difference between the program's outputs (run by
    ``executorch.runtime`` on ``example_inputs``) and the fake-quant model's, as a fraction of the
    reference output's range (max - min). ``argmax_agreement``: fraction of rows (last dim) whose
    argmax agree (None for outputs of fewer than 2 dims). ``float_layers``: layers with a spec that
    the program runs in float. ``calibrated_points``: quantization points whose range training did
    not give (calibrated; or a learned range widened so that it clips no other reader's values).
    ``program``: the ``torch.export`` program that was lowered (q/dq ops, or torchao tensors for the LLM schemes).
    """

    path: str
    size_bytes: int
    max_error: float
    argmax_agreement: float | None
    float_layers: list[str] = field(default_factory=list)
    calibrated_points: list[str] = field(default_factory=list)
    program: Any = field(default=None, repr=False, compare=False)  # the lowered ``ExportedProgram`` (q/dq ops)


class ExecuTorchModule(nn.Module):
    """An ExecuTorch program (``.pte``) run by ``executorch.runtime``, behind an ``nn.Module``.

    >>> import os, tempfile, warnings, torch, torch.nn as nn
    >>> from compress_callbacks.quantization.ptq import calibrate, fake_quantized
    >>> torch.manual_seed(0) and None
    >>> model = calibrate(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval(), [torch.randn(64, 16)])
    >>> x = torch.randn(8, 16)
    >>> with warnings.catch_warnings(record=True):   # it names the one point it calibrated: the logits
    ...     result = export_executorch(model, x[:1], os.path.join(tempfile.mkdtemp(), "model.pte"), calibration=[x])
    >>> result.calibrated_points, result.float_layers, result.max_error <= DEFAULT_TOLERANCE
    (['output of `2` (linear)'], [], True)
    >>> program = ExecuTorchModule(result.path)
    >>> with torch.no_grad(), fake_quantized(model):
    ...     reference = model(x)
    >>> out = program(x)   # 8 rows: run as 8 calls of the program's batch of 1
    >>> out.shape, bool((out - reference).abs().max() <= DEFAULT_TOLERANCE * (reference.max() - reference.min()))
    (torch.Size([8, 4]), True)

    A program takes inputs of the shapes it was exported with (ExecuTorch plans its memory for them), or
    shorter along a symbolic axis (a causal LM's sequence); a multiple of its batch runs in chunks.
    Outputs are on the CPU (one tensor, or a tuple for several). XNNPACK's thread count is process-wide
    (``executorch.extension.pybindings.portable_lib._unsafe_reset_threadpool``).
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        _require_executorch(runtime_only=True)
        from executorch.runtime import Runtime

        self.path = os.fspath(path)
        program = Runtime.get().load_program(self.path)
        self._method = program.load_method("forward")
        meta = program.metadata("forward")
        self.input_shapes = [tuple(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]

    def _chunks(self, inputs: tuple) -> int:
        shapes = [tuple(t.shape) for t in inputs]
        if shapes == self.input_shapes:
            return 1
        batch = self.input_shapes[0][0] if self.input_shapes and self.input_shapes[0] else 0
        chunks = shapes[0][0] // batch if batch and shapes and shapes[0] and shapes[0][0] % batch == 0 else 0
        if len(shapes) == len(self.input_shapes) and chunks and all(  # a symbolic axis takes up to its bound
                len(s) == len(p) and s[0] == batch * chunks and all(a <= b for a, b in zip(s[1:], p[1:])) for s, p in zip(shapes, self.input_shapes)):
            return chunks
        raise ValueError(f"inputs of shapes {shapes} do not fit the program {self.path!r}, which takes {self.input_shapes} "
                         "(or a multiple of its batch; shorter along an axis exported as symbolic)")

    def forward(self, *inputs: torch.Tensor):
        inputs = tuple(t.detach().cpu().contiguous() for t in inputs)
        chunks = self._chunks(inputs)
        try:
            parts = [self._method.execute(list(p)) for p in zip(*(t.chunk(chunks) for t in inputs))]
        except RuntimeError as error:  # a shorter axis in a program that fixed it; other failures stay RuntimeError
            if all(tuple(t.shape[1:]) == p[1:] for t, p in zip(inputs, self.input_shapes)):
                raise
            raise ValueError(f"inputs of shapes {[tuple(t.shape) for t in inputs]} do not fit the program {self.path!r} ({error})") from error
        outputs = [torch.cat(column) for column in zip(*parts)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


# ------------------------------------------------------------------------------------------ checks
def _require_executorch(runtime_only: bool = False) -> None:
    try:
        import executorch.runtime  # noqa: F401

        if not runtime_only:
            import executorch.exir  # noqa: F401
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
    except ImportError as error:
        raise ImportError(f"compress_callbacks needs ExecuTorch (executorch 1.5) for .pte programs: {EDGE_EXTRA} ({error})") from error


def _check_finalized(root: nn.Module) -> None:
    """Live QAT modules (their forward observes and fake-quantizes) or GMP gradient hooks: not finalized."""
    for name, module in root.named_modules():
        if STATE_ATTR in module.__dict__ or hasattr(type(module), "_compress_original_class"):
            raise ValueError(f"`model` is still being quantization-aware trained (module {name or 'model'!r} has live "
                             "fake-quant): export the model `manager.finalize(model)` returns")
    for name, param in root.named_parameters():
        if getattr(param, "_post_accumulate_grad_hooks", None):
            raise ValueError(f"`model` is still attached for training (parameter {name!r} has gradient hooks, as "
                             "GradualMagnitudePruning installs): export the model `manager.finalize(model)` returns")


def _scheme(name: str, spec: LayerQuantSpec) -> str:
    """Which XNNPACK scheme runs a static-path spec: ``"static_int8"`` or ``"weight_only"`` (kept float).
    The LLM schemes take ``executorch_llm.llm_layer_scheme`` (XNNPACK's dynamically quantized linear)."""
    if spec.weight_only:
        return "weight_only"
    if spec.activation_qmax - spec.activation_qmin != INT8_MAX - INT8_MIN:
        raise ValueError(f"`model`: layer {name!r} has activation range [{spec.activation_qmin}, {spec.activation_qmax}]; "
                         "XNNPACK's int8 activations need 256 levels")
    return "static_int8"


# ------------------------------------------------------------------------------------- grid math
def _int8_zero_point(spec: LayerQuantSpec) -> int:
    """The learned zero point on XNNPACK's signed grid (same scale, codes shifted by the range's start)."""
    return int(spec.input_zero_point) + INT8_MIN - spec.activation_qmin


def _represented_range(scale: float, zero_point: int) -> tuple[float, float]:
    """The values an int8 ``(scale, zero_point)`` represents: the inverse of ``activation_qparams``.

    >>> _represented_range(0.5, -128)
    (0.0, 127.5)
    """
    return (INT8_MIN - zero_point) * scale, (INT8_MAX - zero_point) * scale


def _channel_factor(rescaled: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per output channel ``f`` with ``rescaled = weight * f`` (1 for an all-zero channel).

    torchao's ``prepare_pt2e`` folds into a conv / linear any BatchNorm that follows it; where training
    did not fold that BatchNorm, the codes stay the trained ones on the grid ``weight_scale * f``.

    >>> _channel_factor(torch.tensor([[2.0, 4.0], [0.0, 0.0]]), torch.tensor([[1.0, 2.0], [0.0, 0.0]])).tolist()
    [2.0, 1.0]
    """
    rescaled, weight = (t.detach().reshape(t.shape[0], -1).double() for t in (rescaled, weight))
    norm = (weight * weight).sum(1)
    return torch.where(norm > 0, (rescaled * weight).sum(1) / norm.clamp_min(1e-300), 1.0).float()


def _int8_qparams(low: float, high: float) -> tuple[float, int]:
    scale, zero_point = activation_qparams(torch.tensor(low), torch.tensor(high), INT8_MIN, INT8_MAX)
    return float(scale), int(zero_point)


# ----------------------------------------------------------------------------------- graph helpers
def _op_name(node: torch.fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _is_op(node: torch.fx.Node, names: tuple[str, ...]) -> bool:
    return node.op == "call_function" and _op_name(node) in names


def _owner(node: torch.fx.Node) -> str | None:
    """Qualified name of the innermost module a graph node was traced in (None outside any)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path[len("L['self'].") :] if path.startswith("L['self'].") else path


def _layer_nodes(graph: torch.fx.Graph, names: Iterable[str]) -> dict[torch.fx.Node, str]:
    names = set(names)
    return {node: _owner(node) for node in graph.nodes if _is_op(node, _LAYER_OPS) and _owner(node) in names}


def _point_name(node: torch.fx.Node, readers: list[torch.fx.Node] = ()) -> str:
    if node.op == "placeholder":
        name = f"input `{node.name}`"
    else:
        name = f"output of `{_owner(node) or node.name}` ({_op_name(node).split('.')[0]})"
    if readers:
        name += " (also read by " + ", ".join(f"`{_owner(r) or r.name}`" for r in readers) + ")"
    return name


def _plain_layers(graph_model: nn.Module) -> nn.Module:
    """``quantized_copy``'s model with each ``FakeQuantLayer`` back to its layer (weights on the grid)."""
    for name, module in list(graph_model.named_modules()):
        if isinstance(module, FakeQuantLayer):
            _set_submodule(graph_model, name, module.layer)
    return graph_model


@functools.cache
def _point_observer_class() -> type:
    """The observer every quantization point gets (a torchao ``ObserverBase``, so ``convert_pt2e`` reads it).

    It records ranges until its qparams are pinned, and fake-quantizes with them afterwards, so points
    calibrated later see the quantized values of the points before them.
    """
    from torchao.quantization.pt2e import ObserverBase

    class PointObserver(ObserverBase):
        def __init__(self, template: nn.Module) -> None:
            super().__init__(dtype=template.dtype, is_dynamic=False)
            self.qscheme, self.ch_axis = template.qscheme, getattr(template, "ch_axis", 0)
            self.quant_min, self.quant_max = template.quant_min, template.quant_max
            self.observed = RangeObserver(1)
            self.qparams: tuple[torch.Tensor, torch.Tensor] | None = None

        @property
        def per_channel(self) -> bool:
            return self.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)

        def pin(self, scale: torch.Tensor | float, zero_point: torch.Tensor | int) -> None:
            self.qparams = (torch.as_tensor(scale, dtype=torch.float32).reshape(-1),
                            torch.as_tensor(zero_point, dtype=torch.int64).reshape(-1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.qparams is None:
                self.observed.observe(0, x)
                return x
            scale, zero_point = self.qparams
            if self.per_channel:
                return torch.fake_quantize_per_channel_affine(x, scale, zero_point.int(), self.ch_axis, self.quant_min, self.quant_max)
            return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), self.quant_min, self.quant_max)

        def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
            return self.qparams

    return PointObserver


def _quantizer(static_layers: set[str]):
    """ExecuTorch's ``XNNPACKQuantizer`` for the spec'd layers only, over a graph whose BNs are folded."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantizer import SharedQuantizationSpec

    class TrainedLayersQuantizer(XNNPACKQuantizer):
        # BatchNorms are already folded as trained: skip the conv-BN patterns (and their tracing cost)
        SUPPORTED_PATTERNS = [p for p in XNNPACKQuantizer.SUPPORTED_PATTERNS if "bn" not in p.name]

        def annotate(self, model):
            model = super().annotate(model)
            for node in model.graph.nodes:
                annotation = node.meta.get("quantization_annotation")
                if _is_op(node, _AVERAGING_OPS) and annotation is not None and isinstance(annotation.output_qspec, SharedQuantizationSpec):
                    annotation.output_qspec = self.global_config.output_activation
            return model

    quantizer = TrainedLayersQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    # layers without a static spec (excluded from QAT, weight-only) stay float
    return quantizer.set_filter_function(lambda node: not _is_op(node, _LAYER_OPS) or _owner(node) in static_layers)


# ----------------------------------------------------------------------------- quantization points
@dataclass
class _Point:
    observer: nn.Module
    nodes: list[torch.fx.Node]
    weight_of: str | None = None  # layer whose weight this point quantizes
    trained: list[str] = field(default_factory=list)  # layers whose learned input range applies here
    readers: list[torch.fx.Node] = field(default_factory=list)  # other ops reading the quantized values


def _quantization_points(prepared: torch.fx.GraphModule, layers: dict[torch.fx.Node, str]) -> list[_Point]:
    """Group the prepared graph's observer nodes by observer (shared ranges) and say what each feeds.

    A point's values reach a spec'd layer's input directly or through ops that share its range (ReLU,
    max pooling, flatten, reshapes: their outputs are some of its values, so quantizing before or after
    them is the same); any other reader (an Add, a float op, the graph output) is listed in ``readers``.
    """
    from torchao.quantization.pt2e import ObserverBase

    points: dict[int, _Point] = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and isinstance(prepared.get_submodule(node.target), ObserverBase):
            module = prepared.get_submodule(node.target)
            points.setdefault(id(module), _Point(module, [])).nodes.append(node)
    for point in points.values():
        members = set(point.nodes)
        for node in point.nodes:
            for user in node.users:
                if user in layers and len(user.args) > 1 and user.args[1] is node:
                    point.weight_of = layers[user]
                elif user in layers and user.args[0] is node:
                    point.trained.append(layers[user])
                elif not (user.op == "call_function" and user.users and set(user.users) <= members):
                    point.readers.append(user)
    return list(points.values())


def _learned_range(spec: LayerQuantSpec) -> tuple[float, float]:
    return _represented_range(float(spec.input_scale), _int8_zero_point(spec))


def _pin_points(points: list[_Point], qparams: dict[str, LayerQuantSpec], prepared: nn.Module,
                plain_model: nn.Module) -> tuple[list[_Point], list[str], list[str]]:
    """Pin weights and learned input ranges.

    Returns the points left to calibrate, the layers whose learned input range is in the program, and
    the points where several layers' different learned ranges had to be merged (their union).
    """
    to_calibrate, quantized, merged = [], [], []
    for point in points:
        if point.weight_of is not None:
            scale = qparams[point.weight_of].weight_scale.float()
            in_graph = functools.reduce(getattr, point.nodes[0].args[0].target.split("."), prepared)
            trained = plain_model.get_submodule(point.weight_of).weight
            if not torch.equal(in_graph, trained):  # a BatchNorm folded by torchao, not in training
                scale = scale * _channel_factor(in_graph, trained)
            point.observer.pin(scale, torch.zeros(scale.numel(), dtype=torch.int64))
            continue
        quantized.extend(point.trained)
        learned = {(float(qparams[n].input_scale), _int8_zero_point(qparams[n])) for n in point.trained}
        if point.readers or not learned:
            to_calibrate.append(point)
        elif len(learned) == 1:
            point.observer.pin(*learned.pop())
        else:
            ranges = [_learned_range(qparams[n]) for n in point.trained]
            point.observer.pin(*_int8_qparams(min(r[0] for r in ranges), max(r[1] for r in ranges)))
            merged.append(_point_name(point.nodes[0].args[0]) + " (learned ranges of " + ", ".join(f"`{n}`" for n in point.trained) + " merged)")
    return to_calibrate, quantized, merged


def _calibrate_points(prepared: nn.Module, points: list[_Point], batches: Iterable[Any], n_inputs: int,
                      qparams: dict[str, LayerQuantSpec]) -> list[str]:
    """Run the batches through the prepared graph, then pin each point to its calibrated range.

    A point that also carries learned ranges gets the union (a shared range clips nobody's values).
    """
    count = 0
    with torch.no_grad():
        for batch in progress_bar(batches, None, desc="calibrate (ExecuTorch)"):  # a bar on a terminal
            inputs = _as_calibration_batch(batch, n_inputs)
            try:
                prepared(*(t.detach().cpu() for t in inputs))
            except Exception as error:
                raise ValueError(f"`calibration`: a batch does not match the model ({type(error).__name__}: {error})") from error
            count += 1
    if count == 0:
        raise ValueError("`calibration` must hold at least one batch of model inputs, got none")
    names = []
    for point in points:
        low, high = (float(v) for v in (point.observer.observed.observed_min[0], point.observer.observed.observed_max[0]))
        for layer in point.trained:
            learned_low, learned_high = _learned_range(qparams[layer])
            low, high = min(low, learned_low), max(high, learned_high)
        point.observer.pin(*_int8_qparams(low, high))
        names.append(_point_name(point.nodes[0].args[0], point.readers if point.trained else []))
    return names


# ------------------------------------------------------------------------------------------ export
def _export_any_batch(module: nn.Module, inputs: tuple):
    """``torch.export`` with a symbolic batch (dim 0), so calibration batches may have any size.

    A batch of 1 would be specialized: it is traced as a batch of two copies. A model that cannot
    take another batch size is exported as it is (calibration batches must then match).
    """
    doubled = tuple(torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t for t in inputs)
    try:
        return torch.export.export(module, doubled, dynamic_shapes=tuple({0: torch.export.Dim.AUTO} if t.dim() else None for t in doubled))
    except Exception:
        return torch.export.export(module, inputs)


def _quantized_program(graph_model: nn.Module, inputs: tuple, qparams: dict[str, LayerQuantSpec],
                       static_layers: set[str], calibration: Iterable[Any] | None):
    """The q/dq ``ExportedProgram`` with the learned qparams, the static layers the quantizer left float
    (a pattern XNNPACK's quantizer does not annotate) and the calibrated points."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(_export_any_batch(graph_model, inputs).module(), _quantizer(static_layers))
    point_class = _point_observer_class()
    points = _quantization_points(prepared, {})
    for point in points:  # one PointObserver per observer, so shared ranges stay shared
        replacement = point_class(point.observer)
        for node in point.nodes:
            setattr(prepared, node.target, replacement)
    points = _quantization_points(prepared, _layer_nodes(prepared.graph, static_layers))
    to_calibrate, quantized, calibrated = _pin_points(points, qparams, prepared, graph_model)
    if to_calibrate:
        batches = calibration if calibration is not None else [inputs]
        calibrated += _calibrate_points(prepared, to_calibrate, batches, len(inputs), qparams)
    return torch.export.export(convert_pt2e(prepared), inputs), static_layers - set(quantized), calibrated


def _undelegated_layers(edge_program, names: set[str]) -> list[str]:
    """Spec'd layers whose ops the XNNPACK partitioner left outside its delegate (portable kernels)."""
    return sorted({_owner(node) for node in edge_program.graph.nodes
                   if node.op == "call_function" and _owner(node) in names and "delegate" not in _op_name(node)
                   and any(op.split(".")[0] in _op_name(node) for op in ("linear", "convolution", "addmm", "mm"))})


def _lower(plain_model: nn.Module, inputs: tuple, qparams: dict[str, LayerQuantSpec], static_layers: set[str],
           calibration: Iterable[Any] | None):
    """Quantize and lower to XNNPACK; returns the program, the ``.pte`` bytes, static layers left float, calibrated points.

    A static layer whose ops XNNPACK leaves outside its delegate (no int8 kernel: a Conv3d) cannot
    run quantized (ExecuTorch's portable kernels have no quantized ops): it is made float and the
    program built again.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    left_float: set[str] = set()
    with warnings.catch_warnings():  # ExecuTorch's own use of a deprecated pytree class, on every deepcopy
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        while True:
            program, calibrated = torch.export.export(plain_model, inputs), []
            if static_layers:
                program, unannotated, calibrated = _quantized_program(plain_model, inputs, qparams, static_layers, calibration)
                left_float |= unannotated
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            stranded = set(_undelegated_layers(edge.exported_program(), static_layers))
            if not stranded:
                return program, edge.to_executorch().buffer, sorted(left_float), calibrated
            static_layers, left_float = static_layers - stranded, left_float | stranded


def _parity(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float | None]:
    """Largest error as a fraction of each reference output's range, and argmax agreement over rows.

    >>> _parity([torch.tensor([[0.0, 1.5], [2.0, 0.0]])], [torch.tensor([[0.0, 1.0], [1.0, 2.0]])])   # 2.0 off, range 2
    (1.0, 0.5)
    """
    max_error, agree, rows = 0.0, 0, 0
    for out, ref in zip(outputs, reference):
        out, ref = out.float(), ref.float()
        span = float(ref.max() - ref.min()) if ref.numel() else 0.0
        error = float((out - ref).abs().max()) if ref.numel() else 0.0
        max_error = max(max_error, error / span if span > 0 else error)
        if ref.dim() >= 2 and ref.shape[-1] > 1:
            agree += int((out.argmax(-1) == ref.argmax(-1)).sum())
            rows += ref[..., 0].numel()
    return max_error, (agree / rows if rows else None)


def export_executorch(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    calibration: Iterable[Any] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    strict: bool = False,
) -> ExecuTorchExport:
    """Write an XNNPACK ``.pte`` (ExecuTorch) of a finalized model; check it against the fake-quant model.

    ``model``: finalized after QAT (or calibrated with ``ptq.calibrate``): Linear / Conv layers with a
    static spec run in int8 with the learned per-channel weight scales (codes equal to the fake-quant
    codes; 2..8-bit grids are stored as int8) and learned per-tensor input ranges; a BatchNorm folded
    in training is folded as trained. Weight-only specs, layers without a spec and layers XNNPACK
    cannot quantize run in float (named in ``float_layers``). A model without specs (pure-pruned or
    plain float) is lowered in float. The program takes inputs shaped like ``example_inputs``.
    The LLM schemes (``activation_scheme="dynamic"``, ``weight_group_size``: ``executorch_llm``) run as XNNPACK's
    dynamic linears ("8da4w") holding the trained codes; a causal LM runs ``model(input_ids, use_cache=False)``,
    its sequence axis symbolic up to ``example_inputs``' length. Static and dynamic specs in one model: ValueError.

    ``calibration``: a few batches of model inputs for the points XNNPACK quantizes that training
    did not observe (the last layer's output, ``Add`` / ``cat`` / global pooling outputs) and for a
    learned range whose values other ops read too (it gets the union with what they read, so nothing
    is clipped that the fake-quant model keeps). Without it, ``example_inputs`` is used; either way
    the points are named in a warning and in ``calibrated_points``.

    Parity gate: the written program runs on ``example_inputs`` through ``executorch.runtime``; its
    largest error against the fake-quant model (``quantized_copy`` / ``fake_quantized``) as a fraction of the output range
    is ``max_error``. Above ``tolerance`` it warns, or with ``strict=True`` raises ``ValueError`` and
    writes nothing. The file appears at ``path`` only complete (temp file + rename).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ValueError(f"`tolerance` must be a number > 0 (a fraction of the output range), got {tolerance!r}")
    inputs = tuple(t.detach().cpu() for t in _as_tuple(example_inputs))
    calibration = _calibration_batches(calibration, inputs)  # read once, checked before anything runs
    root = unwrap_model(model)
    _check_finalized(root)
    qparams = get_qparams(root)
    llm = any(uses_llm_path(spec) for spec in qparams.values())
    schemes = {name: llm_layer_scheme(name, spec)[0] if llm else _scheme(name, spec) for name, spec in qparams.items()}
    _require_executorch()

    stage = StageBar("export_executorch", ["reference", "quantize and lower", "parity check"], None)  # on a terminal
    stage("reference")
    if llm:
        reference = reference_outputs(root, inputs)
        stage("quantize and lower")
        (program, data, why), calibrated = lower_llm(root, inputs, qparams), []
        float_layers, float_note = sorted(why), ": " + ", ".join(f"{name} ({why[name]})" for name in sorted(why))
    else:
        graph_model = (quantized_copy(root) if qparams else copy.deepcopy(root)).cpu().eval()
        try:
            with torch.no_grad():
                reference = graph_model(*inputs)
        except Exception as error:
            raise ValueError(f"`example_inputs` do not match `model` ({type(error).__name__}: {error})") from error
        reference = [t for t in torch.utils._pytree.tree_leaves(reference) if isinstance(t, torch.Tensor)]
        static_layers = {name for name, scheme in schemes.items() if scheme == "static_int8"}
        stage("quantize and lower")
        program, data, left_float, calibrated = _lower(_plain_layers(graph_model), inputs, qparams, static_layers, calibration)
        float_layers = sorted({name for name, scheme in schemes.items() if scheme == "weight_only"} | set(left_float))
        float_note = f" (weight-only, or not quantizable / not delegated by XNNPACK): {', '.join(float_layers)}"
    if calibrated:
        source = "`calibration`" if calibration is not None else "`example_inputs` alone (pass `calibration=`, a few batches)"
        warnings.warn(f"export_executorch: {len(calibrated)} quantization point(s) that training did not observe were calibrated on "
                      f"{source}: {'; '.join(calibrated)}", stacklevel=2)
    if float_layers:
        warnings.warn(f"export_executorch: {len(float_layers)} layer(s) with a spec run in float in the program{float_note}", stacklevel=2)

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        stage("parity check")
        try:
            outputs = ExecuTorchModule(temporary)(*inputs)
        except (RuntimeError, ValueError) as error:  # e.g. an op only ExecuTorch's portable kernels could run, and they cannot
            raise RuntimeError(f"export_executorch: executorch.runtime cannot run the program on `example_inputs` ({error}); "
                               f"nothing was written at {path!r}") from error
        max_error, agreement = _parity(list(outputs) if isinstance(outputs, tuple) else [outputs], reference)
        if max_error > tolerance:
            message = (f"export_executorch: the program's outputs differ from the fake-quant model's by {max_error:.2%} of the "
                       f"output range (tolerance {tolerance:.2%}; argmax agreement {agreement})")
            if strict:
                raise ValueError(message + "; nothing was written (strict=True)")
            warnings.warn(message, stacklevel=2)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    stage.close()
    return ExecuTorchExport(path, len(data), max_error, agreement, float_layers, calibrated, program)
