"""Our hand-written ONNX passes against ONNX Runtime's quantizer fed the learned scales.

``to_int8`` exports the fake-quant graph (weights folded to int8 by ``onnx_passes``) and, with
``calibration=``, adds calibrated Q/DQ on the outputs ONNX Runtime would otherwise run in float. The
alternative is ONNX Runtime's own ``quantize_static`` on the float (BN-folded) graph with every
learned scale passed as ``TensorQuantOverrides`` (layer inputs per tensor, weights per channel,
``QuantizeBias=False``): once with conv/GEMM outputs left float (what ``to_int8`` does without
``calibration``), once quantizing every op it supports, its own min/max calibration for what has no
override (what ``calibration=`` is for). Same models as ``int8_inference`` (CNN with BatchNorm,
ResNet-style CNN), batch 16, interleaved timing in one process; error = max |int8 - fake-quant| /
max |fake-quant| (the fake-quant model is what training simulated).

    PYTHONPATH=. python benchmarks/onnx_passes.py            # full sizes
    PYTHONPATH=. python benchmarks/onnx_passes.py --quick    # small sizes, < 60 s
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from compress_callbacks.export import FakeQuantLayer, OnnxRuntimeModule, quantized_copy, to_int8  # noqa: E402
from compress_callbacks.quantization.ptq import calibrate  # noqa: E402


def _int8_inference():
    """The sibling benchmark: its models, its interleaved timer and its error measure."""
    spec = importlib.util.spec_from_file_location("benchmarks_int8_inference", os.path.join(HERE, "int8_inference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _float_graph_with_overrides(quantized: nn.Module, x: torch.Tensor):
    """The BN-folded float graph (weights on their grid) as ONNX, and the learned scales as overrides."""
    import onnx

    root = quantized_copy(quantized)
    specs = {}
    for name, module in list(root.named_modules()):
        if isinstance(module, FakeQuantLayer):
            parent, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent) if parent else root, child, module.layer)
            specs["/" + name.replace(".", "/") + "/"] = module.spec
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(root, (x,), buffer, dynamo=False, opset_version=17, input_names=["input_0"],
                          output_names=["output_0"], dynamic_axes={"input_0": {0: "batch"}, "output_0": {0: "batch"}})
    model = onnx.load_from_string(buffer.getvalue())
    overrides, matched = {}, set()
    for node in model.graph.node:
        prefix = node.name.rpartition("/")[0] + "/"
        spec = specs.get(prefix)
        if spec is None or node.op_type not in ("Conv", "Gemm"):
            continue
        matched.add(prefix)
        if not spec.weight_only:
            overrides[node.input[0]] = [{"scale": np.array(spec.input_scale, np.float32),
                                         "zero_point": np.array(spec.input_zero_point, np.uint8)}]
        overrides[node.input[1]] = [{"axis": 0, "scale": np.array(s, np.float32), "zero_point": np.array(0, np.int8)}
                                    for s in spec.weight_scale.tolist()]
    if matched != set(specs):
        raise RuntimeError(f"no ONNX node found for the quantized layers {sorted(set(specs) - matched)}")
    return model, overrides


def ort_quantize_static(quantized: nn.Module, x: torch.Tensor, calibration: list[torch.Tensor], all_ops: bool) -> Callable:
    """ONNX Runtime's ``quantize_static`` (QDQ) with the learned scales as ``TensorQuantOverrides``."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model, overrides = _float_graph_with_overrides(quantized, x[:1])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input_0": b.numpy()} for b in calibration])

        def get_next(self):
            return next(self.batches, None)

    extra = {"TensorQuantOverrides": overrides, "QuantizeBias": False}
    if not all_ops:
        extra["OpTypesToExcludeOutputQuantization"] = ["Conv", "Gemm"]
    with tempfile.TemporaryDirectory() as tmp:
        source, target = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(model, source)
        quantize_static(source, target, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=None if all_ops else ["Conv", "Gemm"], extra_options=extra)
        with open(target, "rb") as f:
            return OnnxRuntimeModule(f.read())


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, few rounds (< 60 s)")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    bench = _int8_inference()
    torch.manual_seed(0)
    rounds = args.rounds or (3 if args.quick else 7)
    min_seconds = 0.02 if args.quick else 0.2
    width = 16 if args.quick else 32
    cases = [(f"CNN+BN width {width}", bench.make_cnn(width)), (f"ResNet-style width {width}", bench.make_resnet(width))]
    lines = [
        f"ONNX passes vs quantize_static + TensorQuantOverrides; torch threads {torch.get_num_threads()}; "
        f"{'quick' if args.quick else 'full'} sizes, {rounds} interleaved rounds, batch 16",
        "",
        "| model | path | ms | ratio vs to_int8 | max err / max |ref| |",
        "|---|---|---|---|---|",
    ]
    for label, fp32 in cases:
        fp32 = bench._randomize_bn(fp32).eval()
        calibration = [torch.randn(16, 3, 32, 32) for _ in range(4)]
        quantized = calibrate(copy.deepcopy(fp32), calibration)
        x = torch.randn(16, 3, 32, 32)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            paths = {
                "to_int8 [shipped]": to_int8(quantized, example_inputs=x[:1]),
                "quantize_static + overrides, conv/GEMM outputs float": ort_quantize_static(quantized, x, calibration, False),
                "to_int8 calibration= [shipped]": to_int8(quantized, example_inputs=x[:1], calibration=calibration),
                "quantize_static + overrides, all ops": ort_quantize_static(quantized, x, calibration, True),
            }
        times = bench.time_interleaved(paths, x, rounds, min_seconds)
        base = times["to_int8 [shipped]"]
        for name, seconds in times.items():
            error = bench._relative_error(paths[name], quantized, x)
            lines.append(f"| {label} | {name} | {seconds * 1e3:.3f} | {seconds / base:.3f} | {error:.4f} |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
