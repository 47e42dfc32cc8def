"""Take a finalized (QAT) or calibrated (PTQ) model further: int8 for CPU, ONNX with Q/DQ, compact files.

A finalized model is a plain float ``nn.Module`` whose quantized layers carry their specs in
``model.compress_qparams`` (see :mod:`compress_callbacks.quantization.spec`). Everything here reads
those specs; nothing is re-estimated, so the int8 model computes what training simulated.

One module each: ``quantized_graph`` (the float graph with BN folded and fake-quant on the learned
grid: ``quantized_copy``, ``FakeQuantLayer``), ``onnx_export`` (``export_onnx``), ``onnx_lm``
(Transformers models through ``torch.export``: dynamic batch and sequence axes), ``onnx_nbits``
(4-bit weights packed as ``MatMulNBits``), ``onnx_passes`` (rewrites of the exported Q/DQ graph), ``ort`` (``OnnxRuntimeModule`` and what export asks of ONNX
Runtime), ``inductor`` (``Int8Layer``, ``InductorInt8Module``), ``int8`` (``to_int8``) and
``compact`` (``save_compressed`` / ``load_compressed``); ``torchao`` (``to_torchao``: torchao quantized
weights for language models).

>>> import os, tempfile, torch, torch.nn as nn
>>> from compress_callbacks.quantization.ptq import calibrate, fake_quantized
>>> torch.manual_seed(0) and None
>>> model = calibrate(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval(), [torch.randn(64, 16)])
>>> x = torch.randn(8, 16)
>>> with torch.no_grad(), fake_quantized(model):
...     reference = model(x)
>>> int8_model = to_int8(model, example_inputs=x)
>>> bool((int8_model(x) - reference).abs().max() <= 0.01 * reference.abs().max())
True
>>> path = os.path.join(tempfile.mkdtemp(), "model.ccz")
>>> save_compressed(model, path)
>>> fresh = load_compressed(path, nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)))
>>> torch.equal(fresh(x), model(x)), sorted(fresh.compress_qparams)
(True, ['0', '2'])
"""

from .compact import load_compressed, save_compressed
from .executorch import ExecuTorchExport, ExecuTorchModule, export_executorch
from .inductor import InductorInt8Module, Int8Layer
from .int8 import cpu_has_vnni, to_int8
from .onnx_export import export_onnx
from .ort import OnnxRuntimeModule
from .quantized_graph import FakeQuantLayer, quantized_copy
from .shrink import load_shrunk, shrink  # structured pruning made physical
from .torchao import to_torchao

__all__ = [
    "to_int8",
    "to_torchao",
    "export_onnx",
    "save_compressed",
    "load_compressed",
    "OnnxRuntimeModule",
    "InductorInt8Module",
    "Int8Layer",
    "FakeQuantLayer",
    "quantized_copy",
    "cpu_has_vnni",
    "shrink",
    "load_shrunk",
    "export_executorch",
    "ExecuTorchExport",
    "ExecuTorchModule",
]
