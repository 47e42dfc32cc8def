"""int8 CPU inference latency vs fp32 eager, and compressed file sizes vs the fp32 state_dict.

Models (issue 4): an MLP 1024-4096-4096-10 at batch 64 and 1, and a small CNN with BatchNorm at
batch 16; also a ResNet-style CNN (residual blocks, the common case where convs feed an Add) at
batch 16. Each model is quantized post-training with ``calibrate`` (the specs a QAT run would
leave), then every path below is timed, interleaved round by round in one process; the ratio is
median latency / median fp32-eager latency (lower is faster).

Shipped paths (``compress_callbacks.export.to_int8``): ``onnxruntime`` (default), the same with
``calibration=`` (the benchmark's calibration batches; CNNs only: it quantizes conv outputs that
nothing else quantizes) and ``inductor``.
Named alternatives: torchao int8 dynamic-activation (eager and ``torch.compile`` with freezing),
ONNX Runtime dynamic int8 (``quantize_dynamic``), ONNX Runtime's own static QDQ quantizer
(``quantize_static``, int8 weights) and ONNX Runtime fp32.

    PYTHONPATH=. python benchmarks/int8_inference.py            # full sizes
    PYTHONPATH=. python benchmarks/int8_inference.py --quick    # small sizes, < 60 s
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compress_callbacks.export import OnnxRuntimeModule, cpu_has_vnni, export_onnx, save_compressed, to_int8  # noqa: E402
from compress_callbacks.quantization.ptq import calibrate, fake_quantized  # noqa: E402


def make_mlp(sizes: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_cnn(width: int = 32) -> nn.Module:
    """The small CNN with BatchNorm (input 3x32x32, 10 classes)."""

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, width), *block(width, 2 * width), nn.MaxPool2d(2),
        *block(2 * width, 4 * width), nn.MaxPool2d(2), *block(4 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10),
    )


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


def make_resnet(width: int = 64) -> nn.Module:
    """A ResNet-style CNN (input 3x32x32, 10 classes): stem, two residual blocks, a strided-down
    widening conv, two more blocks, global pooling, classifier."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        ResidualBlock(width), ResidualBlock(width), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        ResidualBlock(2 * width), ResidualBlock(2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10),
    )


def _randomize_bn(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return model


def _prune(model: nn.Module, sparsity: float) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                k = max(1, int(sparsity * module.weight.numel()))
                threshold = module.weight.abs().flatten().kthvalue(k).values
                module.weight.mul_((module.weight.abs() > threshold).to(module.weight.dtype))
    return model


# ----------------------------------------------------------------------------------------- paths


def _torchao_dynamic(fp32: nn.Module, x: torch.Tensor, compiled: bool) -> Callable:
    import torch._inductor.config as inductor_config
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = copy.deepcopy(fp32)
    quantize_(model, Int8DynamicActivationInt8WeightConfig())  # Linear only: convs stay fp32
    if not compiled:
        return model
    compiled_model = torch.compile(model)

    def run(inp):
        with inductor_config.patch(freezing=True):
            return compiled_model(inp)

    run(x)
    return run


def _onnx_float_bytes(fp32: nn.Module, x: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            fp32, (x,), buffer, dynamo=False, opset_version=17, input_names=["input_0"],
            output_names=["output_0"], dynamic_axes={"input_0": {0: "batch"}, "output_0": {0: "batch"}},
        )
    return buffer.getvalue()


def _ort_dynamic(fp32: nn.Module, x: torch.Tensor) -> Callable:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        source, target = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        with open(source, "wb") as f:
            f.write(_onnx_float_bytes(fp32, x))
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True)
        with open(target, "rb") as f:
            return OnnxRuntimeModule(f.read())


def _ort_static(fp32: nn.Module, x: torch.Tensor, calibration: list[torch.Tensor]) -> Callable:
    """ONNX Runtime's own static QDQ quantizer (its own min/max calibration), for comparison."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input_0": b.numpy()} for b in calibration])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        source, target = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        with open(source, "wb") as f:
            f.write(_onnx_float_bytes(fp32, x))
        quantize_static(
            source, target, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )
        with open(target, "rb") as f:
            return OnnxRuntimeModule(f.read())


def build_paths(
    fp32: nn.Module, quantized: nn.Module, x: torch.Tensor, calibration: list[torch.Tensor], include_compiled: bool
) -> dict[str, Callable]:
    paths: dict[str, Callable] = {
        "fp32 eager": fp32,
        "to_int8 onnxruntime [shipped]": to_int8(quantized, example_inputs=x),
    }
    if x.ndim == 4:
        paths["to_int8 onnxruntime calibration= [shipped]"] = to_int8(quantized, example_inputs=x, calibration=calibration)
    if not cpu_has_vnni():  # the exact default stores uint8 weights here; show what int8 would cost
        paths["to_int8 onnxruntime weight_dtype=int8"] = to_int8(quantized, example_inputs=x, weight_dtype="int8")
    if include_compiled:
        paths["to_int8 inductor [shipped]"] = to_int8(quantized, example_inputs=x, backend="inductor")
    paths["torchao int8 dyn eager"] = _torchao_dynamic(fp32, x, compiled=False)
    if include_compiled:
        paths["torchao int8 dyn compile+freezing"] = _torchao_dynamic(fp32, x, compiled=True)
    paths["ORT dynamic int8"] = _ort_dynamic(fp32, x)
    paths["ORT static QDQ (quantize_static)"] = _ort_static(fp32, x, calibration)
    paths["ORT fp32"] = OnnxRuntimeModule(_onnx_float_bytes(fp32, x))
    return paths


def time_interleaved(paths: dict[str, Callable], x: torch.Tensor, rounds: int, min_seconds: float) -> dict[str, float]:
    """Median seconds per call of each path; paths alternate within every round.

    Before each path's block the process sleeps 50 ms and makes one untimed call: thread pools of the
    path that ran before (ONNX Runtime's spin after a run, and so do OpenMP's) must not compete with the
    path being timed. Without the pause, whatever ran after an ONNX Runtime session was slowed down,
    fp32 eager included (which flattered every ratio) and Inductor at batch 1 most of all (6x).
    """
    samples: dict[str, list[float]] = {name: [] for name in paths}
    with torch.no_grad():
        iterations = {}
        for name, fn in paths.items():  # warm up and size the inner loop
            fn(x)
            start = time.perf_counter()
            fn(x)
            iterations[name] = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-6)))
        for _ in range(rounds):
            for name, fn in paths.items():
                time.sleep(0.05)
                fn(x)
                start = time.perf_counter()
                for _ in range(iterations[name]):
                    fn(x)
                samples[name].append((time.perf_counter() - start) / iterations[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def _relative_error(fn: Callable, quantized: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad(), fake_quantized(quantized):
        reference = quantized(x)
    with torch.no_grad():
        out = fn(x)
    return float((out - reference).abs().max() / reference.abs().max())


# ----------------------------------------------------------------------------------------- sizes


def _file_size(write: Callable[[str], object]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "file")
        write(path)
        return os.path.getsize(path)


def size_rows(fp32: nn.Module, calibration: list[torch.Tensor], x: torch.Tensor) -> list[tuple[str, int]]:
    sparse_fp32 = _prune(copy.deepcopy(fp32), 0.9)
    dense_int8 = calibrate(copy.deepcopy(fp32), calibration)
    sparse_int8 = calibrate(copy.deepcopy(sparse_fp32), calibration)
    return [
        ("fp32 state_dict (torch.save)", _file_size(lambda p: torch.save(fp32.state_dict(), p))),
        ("save_compressed dense int8", _file_size(lambda p: save_compressed(dense_int8, p))),
        ("save_compressed 90%-sparse int8", _file_size(lambda p: save_compressed(sparse_int8, p))),
        ("save_compressed 90%-sparse fp32", _file_size(lambda p: save_compressed(sparse_fp32, p))),
        ("export_onnx Q/DQ (int8 weights)", _file_size(lambda p: export_onnx(dense_int8, example_inputs=x, path=p))),
    ]


# ----------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, few rounds, no torch.compile paths (< 60 s)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch/ORT intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    quick = args.quick
    rounds = args.rounds or (3 if quick else 7)
    min_seconds = 0.02 if quick else 0.2
    mlp_sizes = (256, 1024, 1024, 10) if quick else (1024, 4096, 4096, 10)
    cnn_width = 16 if quick else 32
    cases = [
        (f"MLP {'-'.join(map(str, mlp_sizes))}", make_mlp(mlp_sizes).eval(), [64] if quick else [64, 1], (mlp_sizes[0],)),
        (f"CNN+BN width {cnn_width}", _randomize_bn(make_cnn(cnn_width)).eval(), [16], (3, 32, 32)),
        (f"ResNet-style width {2 * cnn_width}", _randomize_bn(make_resnet(2 * cnn_width)).eval(), [16], (3, 32, 32)),
    ]
    lines = [
        f"CPU VNNI: {cpu_has_vnni()}",
        f"int8 inference, ratio = median latency / fp32 eager (lower is faster); torch threads {torch.get_num_threads()}; "
        f"{'quick' if quick else 'full'} sizes, {rounds} interleaved rounds",
        "",
        f"| model | batch | path | ms | ratio vs fp32 | max err / max |ref| |",
        "|---|---|---|---|---|---|",
    ]
    sizes_done = False
    size_lines: list[str] = []
    for label, fp32, batch_sizes, shape in cases:
        calibration = [torch.randn(64 if len(shape) == 1 else 16, *shape) for _ in range(4)]
        quantized = calibrate(copy.deepcopy(fp32), calibration)
        for batch in batch_sizes:
            x = torch.randn(batch, *shape)
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                paths = build_paths(fp32, quantized, x, calibration, include_compiled=not quick)
            times = time_interleaved(paths, x, rounds, min_seconds)
            base = times["fp32 eager"]
            for name, seconds in times.items():
                err = _relative_error(paths[name], quantized, x) if name.startswith("to_int8") else float("nan")
                err_text = f"{err:.4f}" if err == err else "-"
                lines.append(f"| {label} | {batch} | {name} | {seconds * 1e3:.3f} | {seconds / base:.3f} | {err_text} |")
        if not sizes_done:
            rows = size_rows(fp32, calibration, calibration[0][:1])
            fp32_bytes = rows[0][1]
            size_lines += ["", f"file sizes ({label}):", "", "| file | bytes | ratio vs fp32 state_dict |", "|---|---|---|"]
            size_lines += [f"| {name} | {size} | {size / fp32_bytes:.3f} |" for name, size in rows]
            sizes_done = True
    table = "\n".join(lines + size_lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
