"""ExecuTorch export: XNNPACK ``.pte`` programs that keep the learned weight scales and input ranges.

Stated tolerance (``PARITY_TOLERANCE``): the program run by ``executorch.runtime`` differs from the
fake-quant model by at most 2% of the output range. The program quantizes points the fake-quant
model does not (the last layer's output, a global pooling's input: half a code of a calibrated
range each), and XNNPACK's integer requantization rounds where the float simulation lands on a
boundary (one code); measured here: 0.2% to 0.6%.

Lowering is slow (the first export in a process about 15 s, then a few seconds each), so the
exported programs are module fixtures shared by the tests that read them.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn

from compress_callbacks import CompressionManager, GradualMagnitudePruning, QuantizationAwareTraining
from compress_callbacks.export import ExecuTorchModule, export_executorch
from compress_callbacks.quantization.grid import batchnorm_fold_factor, channel_view
from compress_callbacks.quantization.ptq import calibrate, fake_quantized
from compress_callbacks.quantization.spec import get_qparams, quantize_weight

PARITY_TOLERANCE = 0.02  # of the reference output's range (max - min)
QUANTIZED_DECOMPOSED = "quantized_decomposed"


# ------------------------------------------------------------------------------------------ models
def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


def make_cnn() -> nn.Module:
    """Conv-BN-ReLU, max pooling, conv-BN-ReLU, global average pooling, classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10),
    )


class Residual(nn.Module):
    """``head(fc2(act1(fc1(h)) + h))`` with ``h = act0(fc0(x))``: ``h`` is ``fc1``'s input and the Add's."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        self.act0, self.act1 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        h = self.act0(self.fc0(x))
        return self.head(self.fc2(self.act1(self.fc1(h)) + h))


def randomize_bn(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model


def qat_attached(model: nn.Module, batches, *callbacks) -> CompressionManager:
    """A few QAT steps (fake-quant from step 2); the manager is still attached."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    manager = CompressionManager(*(callbacks or (QuantizationAwareTraining(start_step=2),)))
    manager.attach(model, optimizer)
    for x in batches * 3:
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return manager


def qat_finalized(model: nn.Module, batches) -> nn.Module:
    return qat_attached(model, batches).finalize(model).eval()


# --------------------------------------------------------------------------------- program reading
def owner(node: torch.fx.Node) -> str:
    """Qualified name of the module a node of the exported program comes from."""
    return list(node.meta["nn_module_stack"].values())[-1][0]


def program_constant(program, node: torch.fx.Node) -> torch.Tensor:
    signature = program.graph_signature
    name = {**signature.inputs_to_parameters, **signature.inputs_to_buffers, **signature.inputs_to_lifted_tensor_constants}[node.name]
    return program.state_dict[name] if name in program.state_dict else program.constants[name]


def is_op(node: torch.fx.Node, name: str) -> bool:
    return node.op == "call_function" and node.target.__module__ != "_operator" and node.target.name().endswith(name)


def layer_nodes(program) -> dict[str, torch.fx.Node]:
    return {owner(n): n for n in program.graph.nodes if is_op(n, "linear") or is_op(n, "conv2d")}


def input_qparams(node: torch.fx.Node) -> tuple[float, int, int, int]:
    """``(scale, zero_point, qmin, qmax)`` of the dequantize that feeds a layer's input."""
    dq = node.args[0]
    assert is_op(dq, "dequantize_per_tensor"), dq.target
    return dq.args[1], dq.args[2], dq.args[3], dq.args[4]


def represented(scale: float, zero_point: int, qmin: int = -128, qmax: int = 127) -> tuple[float, float]:
    return (qmin - zero_point) * scale, (qmax - zero_point) * scale


def assert_covers(dq: torch.fx.Node, values: torch.Tensor) -> None:
    """The int8 range of a quantize point holds ``values`` (to half a code: a zero point is an integer)."""
    scale, zero_point = dq.args[1], dq.args[2]
    low, high = represented(scale, zero_point)
    assert low - scale / 2 <= values.min().item() and values.max().item() <= high + scale / 2, (low, high, values.aminmax())


def run_pte(path: str, x: torch.Tensor) -> torch.Tensor:
    from executorch.runtime import Runtime

    return Runtime.get().load_program(path).load_method("forward").execute([x])[0]


def fake_quant_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), fake_quantized(model):
        return model(x)


def assert_close_to(out: torch.Tensor, ref: torch.Tensor) -> None:
    span = (ref.max() - ref.min()).item()
    assert (out - ref).abs().max().item() <= PARITY_TOLERANCE * span, ((out - ref).abs().max().item(), span)


def assert_learned_qparams_in_program(model: nn.Module, program) -> None:
    """Every quantized layer: weight codes and per-channel scales, input scale / zero point as trained."""
    layers = layer_nodes(program)
    specs = get_qparams(model)
    for name, spec in specs.items():
        node = layers[name]
        dq_weight = node.args[1]
        assert is_op(dq_weight, "dequantize_per_channel")
        codes = program_constant(program, dq_weight.args[0])
        scale = program_constant(program, dq_weight.args[1])
        weight = model.get_submodule(name).weight.detach()
        if spec.bn is not None:  # the folded conv that training quantized
            weight = weight * channel_view(batchnorm_fold_factor(model.get_submodule(spec.bn)), weight.dim())
        assert codes.dtype == torch.int8 and torch.equal(codes, quantize_weight(weight, spec)), name
        assert torch.equal(scale, spec.weight_scale), name
        assert torch.equal(program_constant(program, dq_weight.args[2]), torch.zeros_like(program_constant(program, dq_weight.args[2])))
        in_scale, in_zero_point, qmin, qmax = input_qparams(node)
        assert (in_scale, in_zero_point, qmin, qmax) == (spec.input_scale, spec.input_zero_point - 128, -128, 127), name


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def qat_mlp_export(tmp_path_factory):
    torch.manual_seed(1)
    batches = [torch.randn(32, 32) for _ in range(3)]
    model = qat_finalized(make_mlp(), batches)
    path = tmp_path_factory.mktemp("mlp") / "mlp.pte"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_executorch(model, batches[0], path)
    return model, batches, result, caught


@pytest.fixture(scope="module")
def qat_cnn_export(tmp_path_factory):
    torch.manual_seed(2)
    batches = [torch.randn(16, 3, 8, 8) for _ in range(3)]
    model = qat_finalized(randomize_bn(make_cnn()), batches)
    path = tmp_path_factory.mktemp("cnn") / "cnn.pte"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_executorch(model, batches[0], path, calibration=batches)
    return model, batches, result, caught


# ------------------------------------------------------------------------------------------- tests
def test_mlp_program_holds_the_learned_qparams_and_matches_the_fake_quant_model(qat_mlp_export):
    model, batches, result, caught = qat_mlp_export
    assert_learned_qparams_in_program(model, result.program)
    assert result.float_layers == [] and result.calibrated_points == ["output of `4` (linear)"]
    assert any("example_inputs" in str(w.message) and "output of `4`" in str(w.message) for w in caught)
    reference = fake_quant_outputs(model, batches[0])
    assert_close_to(run_pte(result.path, batches[0]), reference)
    assert 0 < result.max_error <= PARITY_TOLERANCE and result.argmax_agreement >= 0.9
    assert os.path.getsize(result.path) == result.size_bytes


def test_executorch_module_runs_a_multiple_of_the_program_batch_in_chunks(qat_mlp_export):
    _, batches, result, _ = qat_mlp_export
    program = ExecuTorchModule(result.path)
    assert program.input_shapes == [(32, 32)]
    everything = torch.cat(batches)
    out = program(everything)
    assert out.shape == (96, 5)
    assert all(torch.equal(part, run_pte(result.path, x)) for part, x in zip(out.split(32), batches))
    with pytest.raises(ValueError, match="do not fit"):
        program(everything[:40])


def test_cnn_program_folds_bn_as_trained_and_matches_the_fake_quant_model(qat_cnn_export):
    model, batches, result, _ = qat_cnn_export
    assert get_qparams(model)["0"].bn == "1" and get_qparams(model)["4"].bn == "5"
    assert_learned_qparams_in_program(model, result.program)
    assert not any(is_op(n, "batch_norm") or is_op(n, "_native_batch_norm_legit_no_training") for n in result.program.graph.nodes)
    assert_close_to(run_pte(result.path, batches[0]), fake_quant_outputs(model, batches[0]))
    assert result.max_error <= PARITY_TOLERANCE and result.argmax_agreement >= 0.9


def test_points_training_never_saw_are_calibrated_and_named(qat_cnn_export):
    """The conv output before global pooling and the logits: calibrated on `calibration`, covering it.

    The pooled values feed the classifier with its learned range (the pooling has a range of its own,
    not the conv output's), and the max pooling shares the learned range of the conv it feeds.
    """
    model, batches, result, caught = qat_cnn_export
    assert result.calibrated_points == ["output of `6` (relu)", "output of `9` (linear)"]
    messages = [str(w.message) for w in caught if "calibrated on `calibration`" in str(w.message)]
    assert len(messages) == 1 and "output of `6` (relu)" in messages[0] and "output of `9` (linear)" in messages[0]
    pool = next(n for n in result.program.graph.nodes if is_op(n, "adaptive_avg_pool2d"))
    relu_q = pool.args[0].args[0]  # dequantize <- quantize of the relu output
    features = nn.Sequential(*list(model)[:7])
    with torch.no_grad(), fake_quantized(model):
        assert_covers(relu_q, torch.cat([features(x).flatten() for x in batches]))
        assert_covers(list(result.program.graph.output_node().args[0])[0], torch.cat([model(x).flatten() for x in batches]))
    spec = get_qparams(model)["9"]
    pooled_scale, pooled_zero_point, _, _ = input_qparams(layer_nodes(result.program)["9"])
    assert (pooled_scale, pooled_zero_point) == (spec.input_scale, spec.input_zero_point - 128)
    assert (pooled_scale, pooled_zero_point) != (relu_q.args[1], relu_q.args[2])


def test_shared_range_is_widened_so_it_clips_no_other_reader_and_float_layers_are_named(tmp_path):
    """``h`` is ``fc1``'s input (learned range) and the residual Add's: the program's range covers both.

    ``fc2`` is weight-only (XNNPACK's static int8 needs a quantized input): it stays float, named;
    ``head`` has no spec and is simply float.
    """
    torch.manual_seed(3)
    batches = [torch.randn(32, 16) * 2 for _ in range(3)]
    model = Residual().eval()
    calibrate(model, batches[:1], modules=["fc0", "fc1"])  # learned on one batch: narrower than all three
    calibrate(model, batches[:1], modules=["fc2"], activation_bits=None)
    with warnings.catch_warnings(record=True) as caught:  # a tolerance below its error: it warns, still writes
        warnings.simplefilter("always")
        result = export_executorch(model, batches[0], tmp_path / "residual.pte", calibration=batches, tolerance=1e-6)
    assert result.float_layers == ["fc2"]
    assert any("run in float" in str(w.message) and "fc2" in str(w.message) for w in caught)
    assert any("differ from the fake-quant model" in str(w.message) for w in caught)
    assert os.path.getsize(result.path) == result.size_bytes and 1e-6 < result.max_error <= PARITY_TOLERANCE
    assert "output of `act0` (relu) (also read by `add`)" in result.calibrated_points
    dq = layer_nodes(result.program)["fc1"].args[0]
    learned = get_qparams(model)["fc1"]
    learned_low, learned_high = represented(learned.input_scale, learned.input_zero_point - 128)
    with torch.no_grad(), fake_quantized(model):  # h as the program computes it: fc0's input quantized
        h = torch.cat([model.act0(model.fc0(x)) for x in batches])
    assert_covers(dq, torch.cat([h.flatten(), torch.tensor([learned_low, learned_high])]))
    assert represented(dq.args[1], dq.args[2])[1] > learned_high  # wider than learned: the Add's values are not clipped


def test_a_layer_xnnpack_leaves_outside_its_delegate_is_made_float_and_named(tmp_path, monkeypatch):
    """XNNPACK without its convolution kernels stands in for a layer it cannot run in int8 (ExecuTorch's
    portable kernels have no quantized ops): the conv is built again in float, named, and the rest stays int8."""
    from executorch.backends.xnnpack.partition import xnnpack_partitioner
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS

    without_convolution = [config for config in ALL_PARTITIONER_CONFIGS if config.__name__ != "ConvolutionConfig"]
    partitioner = xnnpack_partitioner.XnnpackPartitioner
    monkeypatch.setattr(xnnpack_partitioner, "XnnpackPartitioner", lambda: partitioner(configs=without_convolution))
    torch.manual_seed(6)
    x = torch.randn(8, 3, 6, 6)
    model = calibrate(randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                                 nn.Linear(64, 5))).eval(), [x])
    with pytest.warns(UserWarning, match=r"1 layer\(s\) with a spec run in float.*: 0$"):
        result = export_executorch(model, x, tmp_path / "float_conv.pte", calibration=[x])
    assert result.float_layers == ["0"]
    layers = layer_nodes(result.program)
    assert not any(QUANTIZED_DECOMPOSED in str(n.target) for n in layers["0"].all_input_nodes)  # float conv
    spec = get_qparams(model)["4"]
    assert input_qparams(layers["4"])[:2] == (spec.input_scale, spec.input_zero_point - 128)  # still int8
    assert result.max_error <= PARITY_TOLERANCE


def test_batchnorm_training_left_unfolded_keeps_the_trained_codes(tmp_path):
    """torchao folds every BatchNorm after a conv / linear; where training did not (``fold_bn=False``,
    a Linear before a BatchNorm1d) the program keeps the trained codes on the rescaled grid."""
    torch.manual_seed(7)
    x = torch.randn(16, 3, 6, 6)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                       nn.Linear(64, 8), nn.BatchNorm1d(8))).eval()
    with torch.no_grad():
        model[5].running_var.uniform_(0.3, 3.0)
    calibrate(model, [x], fold_bn=False)
    assert all(spec.bn is None for spec in get_qparams(model).values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export_executorch(model, x, tmp_path / "unfolded.pte", calibration=[x])
    layers = layer_nodes(result.program)
    for name, bn in (("0", model[1]), ("4", model[5])):
        spec = get_qparams(model)[name]
        dq_weight = layers[name].args[1]
        codes = program_constant(result.program, dq_weight.args[0])
        assert torch.equal(codes, quantize_weight(model.get_submodule(name).weight.detach(), spec)), name
        scale = program_constant(result.program, dq_weight.args[1])
        assert torch.allclose(scale, spec.weight_scale * batchnorm_fold_factor(bn), rtol=1e-5), name
    assert_close_to(run_pte(result.path, x), fake_quant_outputs(model, x))


def test_pure_pruned_float_model_exports_float(tmp_path):
    torch.manual_seed(4)
    batches = [torch.randn(32, 32) for _ in range(3)]
    model = make_mlp()
    gmp = GradualMagnitudePruning(target_sparsity=0.5, start_step=0, end_step=2, update_every=1)
    model = qat_attached(model, batches, gmp).finalize(model).eval()
    assert (model[0].weight == 0).float().mean().item() >= 0.5
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="export_executorch")  # nothing calibrated, nothing left float
        result = export_executorch(model, batches[0], tmp_path / "pruned.pte")
    assert result.calibrated_points == [] and result.float_layers == []
    assert not any(QUANTIZED_DECOMPOSED in str(n.target) for n in result.program.graph.nodes)
    with torch.no_grad():
        reference = model(batches[0])
    assert torch.allclose(run_pte(result.path, batches[0]), reference, atol=1e-5)
    assert result.max_error < 1e-5 and result.argmax_agreement == 1.0


def _bad_export(tmp_path, model, example_inputs, error, match, **kwargs):
    path = tmp_path / "bad.pte"
    with pytest.raises(error, match=match):
        export_executorch(model, example_inputs, path, **kwargs)
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)  # no file, no temporary left behind


def test_bad_input_raises_before_anything_is_written(tmp_path, monkeypatch):
    torch.manual_seed(5)
    batches = [torch.randn(8, 32) for _ in range(2)]
    live = make_mlp()
    manager = qat_attached(live, batches)
    _bad_export(tmp_path, live, batches[0], ValueError, "finalize")  # live QAT modules
    manager.finalize(live)
    pruning = make_mlp()
    qat_attached(pruning, batches, GradualMagnitudePruning(target_sparsity=0.5, start_step=0, end_step=2, update_every=1))
    _bad_export(tmp_path, pruning, batches[0], ValueError, "finalize")  # GMP's gradient hooks still installed
    _bad_export(tmp_path, live, torch.randn(8, 31), ValueError, "example_inputs")
    _bad_export(tmp_path, live, [1.0], TypeError, "example_inputs")
    _bad_export(tmp_path, live, batches[0], ValueError, "tolerance", tolerance=0)
    _bad_export(tmp_path, live, batches[0], TypeError, "calibration", calibration=batches[0])
    grouped = make_mlp()
    calibrate(grouped, batches)
    grouped.compress_qparams["2"].weight_group_size = 32  # one LLM-scheme layer among static int8 ones: mixed, refused
    _bad_export(tmp_path, grouped, batches[0], ValueError, r"layer '0' has static per-tensor input ranges while other layers use the LLM")
    for name in [m for m in sys.modules if m == "executorch" or m.startswith("executorch.")]:
        monkeypatch.setitem(sys.modules, name, None)
    _bad_export(tmp_path, live, batches[0], ImportError, r"compress-callbacks\[edge\]")


def test_strict_parity_failure_raises_and_writes_nothing(qat_mlp_export, tmp_path):
    model, batches, _, _ = qat_mlp_export
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _bad_export(tmp_path, model, batches[0], ValueError, "strict=True", tolerance=1e-9, strict=True)
