"""ExecuTorch ``.pte`` programs (XNNPACK): size, latency and accuracy of ``export_executorch``'s int8 program.

Compared on the same model, in one process: the fp32 ``.pte`` (the float model lowered to XNNPACK),
ExecuTorch's own post-training flow (``XNNPACKQuantizer`` per-channel + its HistogramObserver
calibration on the same batches + ``to_edge_transform_and_lower``) and ``to_int8`` (ONNX Runtime).

Models: the digits student MLP 64-128-64-10 (the example's architecture), trained here on
scikit-learn's digits: fp32 for N epochs, then the same run continued with
``QuantizationAwareTraining`` (fp32 + QAT epochs; the fp32 row and ExecuTorch's PTQ use the fp32
model trained for the same total number of epochs); and the CNN+BN and the ResNet-style CNN of
``int8_inference`` (random 3x32x32 inputs, specs from ``ptq.calibrate``, which is what a QAT run leaves).

Latency: batch 1 (programs are exported for it), median of interleaved rounds
(``int8_inference.time_interleaved``), XNNPACK, torch and ONNX Runtime on the same number of threads.
Accuracy: the digits test split (30%, 540 images) run through each program.

    PYTHONPATH=. python benchmarks/executorch_export.py              # full
    PYTHONPATH=. python benchmarks/executorch_export.py --quick      # fewer epochs and rounds, a small CNN only
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import int8_inference as int8_bench  # noqa: E402  (sibling benchmark: models and the interleaved timer)
import qat_quality  # noqa: E402  (sibling benchmark: digits data and the fp32 / QAT training loop)

from compress_callbacks import QuantizationAwareTraining  # noqa: E402
from compress_callbacks.export import ExecuTorchModule, export_executorch, export_onnx, to_int8  # noqa: E402
from compress_callbacks.quantization.ptq import calibrate, fake_quantized  # noqa: E402


def set_threads(threads: int) -> int:
    """torch (and so ONNX Runtime through ``OnnxRuntimeModule``) and XNNPACK's thread pool; returns XNNPACK's before."""
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count, _unsafe_reset_threadpool

    before = _threadpool_get_thread_count()
    torch.set_num_threads(threads)
    _unsafe_reset_threadpool(threads)
    return before


def executorch_ptq(fp32: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor], path: str) -> str:
    """ExecuTorch's documented post-training flow for XNNPACK, on the float model."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    traced = torch.cat([example, example])  # a batch of 2 keeps the batch dimension symbolic for calibration
    graph = torch.export.export(copy.deepcopy(fp32).eval(), (traced,), dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    program = torch.export.export(convert_pt2e(prepared), (example,))
    data = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
    with open(path, "wb") as f:
        f.write(data)
    return path


#: paths built from the specs (their reference is the fake-quant model); the others start from the fp32 model
FROM_SPECS = ("export_executorch int8 .pte [shipped]", "to_int8 onnxruntime")


def _fake_quant(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), fake_quantized(model):
        return model(x)


def _max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / (ref.max() - ref.min()))


def measure_case(label: str, fp32: nn.Module, quantized: nn.Module, calibration: list[torch.Tensor], eval_x: torch.Tensor,
                 tmp: str, rounds: int, min_seconds: float) -> tuple[list[str], dict[str, nn.Module]]:
    """Rows of the size / latency table for one model; also the programs, for the accuracy table."""
    example = eval_x[:1]
    started = time.perf_counter()
    ours = export_executorch(quantized, example, os.path.join(tmp, f"{label}-int8.pte"), calibration=calibration)
    export_seconds = time.perf_counter() - started
    fp32_pte = export_executorch(fp32, example, os.path.join(tmp, f"{label}-fp32.pte")).path
    started = time.perf_counter()
    ptq_pte = executorch_ptq(fp32, example, calibration, os.path.join(tmp, f"{label}-ptq.pte"))
    ptq_seconds = time.perf_counter() - started
    onnx_path = export_onnx(quantized, example_inputs=example, path=os.path.join(tmp, f"{label}.onnx"))
    ort_kwargs = {"calibration": calibration} if eval_x.dim() == 4 else {}  # CNNs: int8 conv outputs (to_int8 docs)
    programs = {
        "fp32 .pte": ExecuTorchModule(fp32_pte),
        "export_executorch int8 .pte [shipped]": ExecuTorchModule(ours.path),
        "ExecuTorch PTQ .pte (XNNPACKQuantizer)": ExecuTorchModule(ptq_pte),
        "to_int8 onnxruntime": to_int8(quantized, example_inputs=example, **ort_kwargs),
    }
    files = {"fp32 .pte": fp32_pte, "export_executorch int8 .pte [shipped]": ours.path,
             "ExecuTorch PTQ .pte (XNNPACKQuantizer)": ptq_pte, "to_int8 onnxruntime": onnx_path}
    times = int8_bench.time_interleaved(programs, example, rounds, min_seconds)
    reference = _fake_quant(quantized, eval_x)
    with torch.no_grad():
        fp32_out = fp32(eval_x)
    fp32_bytes, ptq_seconds_per_call = os.path.getsize(fp32_pte), times["ExecuTorch PTQ .pte (XNNPACKQuantizer)"]
    rows = []
    for name, program in programs.items():
        with torch.no_grad():
            out = program(eval_x)
        size = os.path.getsize(files[name])
        error = _max_error(out, reference if name in FROM_SPECS else fp32_out)
        rows.append(f"| {label} | {name} | {size:,} | {size / fp32_bytes:.3f} | {times[name] * 1e3:.4f} | "
                    f"{times[name] / ptq_seconds_per_call:.3f} | {error:.4f} |")
    rows.append(f"| {label} | (export seconds: export_executorch {export_seconds:.1f}, ExecuTorch PTQ {ptq_seconds:.1f}; "
                f"calibrated points: {'; '.join(ours.calibrated_points) or 'none'}) | | | | | |")
    return rows, programs


def digits_case(fp32_epochs: int, qat_epochs: int, seed: int = 0):
    x_train, y_train, x_test, y_test = qat_quality.load_data(seed)
    steps_per_epoch = (len(x_train) + 63) // 64

    def student() -> nn.Module:
        torch.manual_seed(seed)
        return int8_bench.make_mlp((64, 128, 64, 10))

    fp32 = qat_quality.train(student(), x_train, y_train, fp32_epochs + qat_epochs, seed)
    qat = QuantizationAwareTraining(start_step=fp32_epochs * steps_per_epoch)
    quantized = qat_quality.train(student(), x_train, y_train, fp32_epochs + qat_epochs, seed, qat=qat)
    calibration = [x_train[i : i + 128] for i in range(0, 512, 128)]
    return fp32, quantized, calibration, x_test, y_test


def accuracy_rows(fp32: nn.Module, quantized: nn.Module, programs: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor) -> list[str]:
    fake_quant = _fake_quant(quantized, x)
    with torch.no_grad():
        outputs = {"fp32 model (eager)": fp32(x), "QAT fake-quant model (eager)": fake_quant}
        outputs.update({name: program(x) for name, program in programs.items()})
    rows = []
    for name, out in outputs.items():
        accuracy = float((out.argmax(-1) == y).float().mean())
        agreement = float((out.argmax(-1) == fake_quant.argmax(-1)).float().mean())
        rows.append(f"| {name} | {accuracy:.4f} | {agreement:.4f} |")
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and rounds, a small CNN only")
    parser.add_argument("--threads", type=int, default=1, help="torch, ONNX Runtime and XNNPACK threads (default: 1)")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    quick = args.quick
    rounds = args.rounds or (3 if quick else 7)
    min_seconds = 0.02 if quick else 0.2
    warnings.filterwarnings("ignore")
    threads = torch.get_num_threads()
    xnnpack_threads = set_threads(args.threads)
    torch.manual_seed(0)
    lines = [
        f"ExecuTorch XNNPACK programs, batch 1, {args.threads} thread(s) (torch, ONNX Runtime, XNNPACK); "
        f"{'quick' if quick else 'full'}, {rounds} interleaved rounds; size ratio vs the fp32 .pte, latency ratio vs "
        "ExecuTorch's own PTQ program; max err = max |out - ref| / ref range over the evaluation inputs, ref = the "
        "fake-quant model for export_executorch and to_int8, the fp32 model for the fp32 .pte and ExecuTorch's PTQ",
        "",
        "| model | path | bytes | size vs fp32 .pte | ms (batch 1) | latency vs ET PTQ | max err |",
        "|---|---|---|---|---|---|---|",
    ]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            fp32, quantized, calibration, x_test, y_test = digits_case(*((8, 4) if quick else (30, 20)))
            rows, programs = measure_case("digits MLP 64-128-64-10", fp32, quantized, calibration, x_test, tmp, rounds, min_seconds)
            lines += rows
            accuracy_lines = accuracy_rows(fp32, quantized, programs, x_test, y_test)
            width = 16 if quick else 32
            shape = (3, 32, 32)
            cnns = [(f"CNN+BN width {width}", int8_bench.make_cnn(width))]
            if not quick:  # each model is lowered three times: --quick keeps to the digits MLP and the CNN
                cnns.append((f"ResNet-style width {2 * width}", int8_bench.make_resnet(2 * width)))
            for label, model in cnns:
                fp32 = int8_bench._randomize_bn(model).eval()
                calibration = [torch.randn(16, *shape) for _ in range(4)]
                quantized = calibrate(copy.deepcopy(fp32), calibration)
                lines += measure_case(label, fp32, quantized, calibration, torch.randn(64, *shape), tmp, rounds, min_seconds)[0]
    finally:
        set_threads(xnnpack_threads)
        torch.set_num_threads(threads)
    lines += ["", f"digits test split ({len(y_test)} images): accuracy, and argmax agreement with the QAT fake-quant model",
              "", "| path | accuracy | agreement w/ fake-quant |", "|---|---|---|"] + accuracy_lines
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
