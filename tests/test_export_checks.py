"""Export with bad input and unusual models: unfinished models, files that are not compressed
checkpoints, loads that do not fit, input counts, structured outputs, half precision, calibration."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn

from compress_callbacks import CompressionManager, GradualMagnitudePruning, QuantizationAwareTraining
from compress_callbacks.export import export_onnx, load_compressed, save_compressed, to_int8
from compress_callbacks.quantization.ptq import calibrate, fake_quantized
from compress_callbacks.quantization.spec import QPARAMS_ATTR, get_qparams

INT8_TOLERANCE = 0.01  # of max |reference output|, as in test_export.py


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))


def data(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 16, generator=g) for _ in range(n)]


def calibrated_mlp(seed=0):
    return calibrate(make_mlp(seed).eval(), data(), weight_bits=7)


def reference(model, *inputs):
    with torch.no_grad(), fake_quantized(model):
        return model(*inputs)


def assert_int8_close(out, ref):
    error = (out.float() - ref.float()).abs().max().item()
    assert error <= INT8_TOLERANCE * ref.abs().max().item(), (error, ref.abs().max().item())


def training(model, *callbacks, steps=3):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    manager = CompressionManager(*callbacks)
    manager.attach(model, optimizer)
    for x in data(steps):
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return manager


# ------------------------------------------------------------------------------ unfinished models
def test_save_compressed_refuses_a_model_that_was_not_finalized(tmp_path):
    model = make_mlp()
    manager = training(model, GradualMagnitudePruning(0.5, 0, 2, update_every=1), QuantizationAwareTraining(start_step=1))
    with pytest.raises(ValueError, match="finalize"):
        save_compressed(model, tmp_path / "m.ccz")
    with pytest.raises(ValueError, match="finalize"):  # a copy carries live fake-quant layers: no ranges either
        save_compressed(copy.deepcopy(model), tmp_path / "m.ccz")
    with pytest.raises(ValueError, match="finalize"):  # a part of the model in training
        save_compressed(model[2], tmp_path / "m.ccz")
    assert not (tmp_path / "m.ccz").exists()

    compressed = manager.finalize(model)
    save_compressed(compressed, tmp_path / "m.ccz")
    fresh = load_compressed(tmp_path / "m.ccz", make_mlp(seed=5))
    assert sorted(get_qparams(fresh)) == ["0", "2", "4"]


def test_save_compressed_refuses_a_model_under_pruning_alone_until_finalized(tmp_path):
    model = make_mlp()
    manager = training(model, GradualMagnitudePruning(0.5, 0, 2, update_every=1))
    with pytest.raises(ValueError, match="finalize"):
        save_compressed(model, tmp_path / "m.ccz")
    manager.finalize(model)
    save_compressed(model, tmp_path / "m.ccz")


def test_a_plain_float_model_without_specs_may_be_saved(tmp_path):
    model = make_mlp()
    save_compressed(model, tmp_path / "m.ccz")
    fresh = load_compressed(tmp_path / "m.ccz", make_mlp(seed=3))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert get_qparams(fresh) == {}


def test_int8_conversion_refuses_a_model_still_under_compression():
    model = calibrated_mlp()
    training(model, GradualMagnitudePruning(0.5, 0, 2, update_every=1))
    with pytest.raises(ValueError, match="finalize"):
        to_int8(model, example_inputs=data()[0])


# ------------------------------------------------------------------------------ loading files
def test_load_compressed_refuses_files_that_are_not_compressed_checkpoints(tmp_path):
    save_compressed(calibrated_mlp(), tmp_path / "good.ccz")
    good = torch.load(tmp_path / "good.ccz", weights_only=True)
    (tmp_path / "text.ccz").write_text("not a checkpoint")
    torch.save(make_mlp().state_dict(), tmp_path / "state_dict.pt")
    torch.save({"format": good["format"]}, tmp_path / "no_tensors.ccz")
    broken = copy.deepcopy(good)
    next(iter(broken["tensors"].values()))["kind"] = "zstd"
    torch.save(broken, tmp_path / "unknown_kind.ccz")
    truncated = copy.deepcopy(good)
    del truncated["tensors"]["0.weight"]["values"]
    torch.save(truncated, tmp_path / "truncated.ccz")

    fresh = make_mlp(seed=4)
    before = copy.deepcopy(fresh.state_dict())
    for name in ("text.ccz", "state_dict.pt", "no_tensors.ccz", "unknown_kind.ccz", "truncated.ccz"):
        with pytest.raises(ValueError, match=name):
            load_compressed(tmp_path / name, fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert QPARAMS_ATTR not in fresh.__dict__


@pytest.mark.parametrize(
    "other",
    [
        lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 5)),  # a shape
        lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU()),  # a layer missing
        lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4), nn.Linear(4, 4)),
    ],
)
def test_a_load_that_does_not_fit_leaves_the_fresh_model_untouched(tmp_path, other):
    save_compressed(calibrated_mlp(), tmp_path / "m.ccz")
    torch.manual_seed(7)
    fresh = other()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match="fresh_model"):
        load_compressed(tmp_path / "m.ccz", fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert QPARAMS_ATTR not in fresh.__dict__


# ------------------------------------------------------------------------------ the int8 module's inputs and outputs
class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x, mask):
        return self.b(torch.relu(self.a(x * mask)))


class IgnoresItsSecondInput(TwoInputs):
    def forward(self, x, unused):
        return self.b(torch.relu(self.a(x)))


class StructuredOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        hidden = torch.relu(self.a(x))
        return {"logits": self.b(hidden), "extra": (hidden, {"twice": 2 * hidden})}


def test_the_int8_module_refuses_another_number_of_inputs():
    torch.manual_seed(0)
    x, mask = data()[0], (torch.rand(8, 16) > 0.5).float()
    model = calibrate(TwoInputs().eval(), [(x, mask)], weight_bits=7)
    int8_model = to_int8(model, example_inputs=(x, mask))
    assert_int8_close(int8_model(x, mask), reference(model, x, mask))
    with pytest.raises(ValueError, match="2 input"):
        int8_model(x)
    with pytest.raises(ValueError, match="2 input"):
        int8_model(x, mask, mask)
    with pytest.raises(TypeError, match="attention_mask"):
        int8_model(x, mask, attention_mask=mask)

    plain = calibrate(make_mlp().eval(), [x], weight_bits=7)
    single = to_int8(plain, example_inputs=x)
    with pytest.raises(ValueError, match="1 input.*got 2"):  # an attention_mask that would be silently dropped
        single(x, mask)


def test_an_input_the_graph_does_not_use_is_still_expected_in_its_place():
    torch.manual_seed(0)
    x, other = data()[0], torch.randn(8, 16)
    model = calibrate(IgnoresItsSecondInput().eval(), [(x, other)], weight_bits=7)
    int8_model = to_int8(model, example_inputs=(x, other))
    assert_int8_close(int8_model(x, torch.zeros(8, 16)), reference(model, x, other))
    with pytest.raises(ValueError, match="2 input"):
        int8_model(x)


def test_structured_outputs_come_back_in_the_same_structure():
    torch.manual_seed(0)
    x = data()[0]
    model = calibrate(StructuredOutput().eval(), [x], weight_bits=7)
    expected = reference(model, x)
    for int8_model in (to_int8(model, example_inputs=x), pickle.loads(pickle.dumps(to_int8(model, example_inputs=x)))):
        out = int8_model(x)
        assert isinstance(out, dict) and list(out) == ["logits", "extra"]
        hidden, inner = out["extra"]
        assert isinstance(inner, dict) and list(inner) == ["twice"]
        assert_int8_close(out["logits"], expected["logits"])
        assert_int8_close(hidden, expected["extra"][0])
        assert_int8_close(inner["twice"], expected["extra"][1]["twice"])


class OneKey(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 4)

    def forward(self, x):
        return {"logits": self.a(x)}


def test_a_one_key_dict_output_stays_a_dict():
    x = data()[0]
    model = calibrate(OneKey().eval(), [x], weight_bits=7)
    out = to_int8(model, example_inputs=x)(x)
    assert isinstance(out, dict) and list(out) == ["logits"]
    assert_int8_close(out["logits"], reference(model, x)["logits"])


# ------------------------------------------------------------------------------ half precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_converts_in_float32(tmp_path, dtype):
    model = calibrated_mlp()
    expected = to_int8(model, example_inputs=data()[0])(data()[1])
    half = copy.deepcopy(model).to(dtype)
    with pytest.warns(UserWarning, match="float32"):
        int8_model = to_int8(half, example_inputs=data()[0].to(dtype))
    out = int8_model(data()[1].to(dtype))
    assert out.dtype == torch.float32
    assert_int8_close(out, expected)  # the half weights are on the same grid: nearly the float32 result
    with pytest.warns(UserWarning, match="float32"):
        export_onnx(half, example_inputs=data()[0].to(dtype), path=tmp_path / "half.onnx")
    assert all(p.dtype == dtype for p in half.parameters())  # the model itself is left as it is


# ------------------------------------------------------------------------------ calibration batches
def test_calibration_batches_are_checked_even_when_no_layer_needs_them(tmp_path):
    model = calibrated_mlp()
    x = data()[0]
    with pytest.raises(ValueError, match=r"`calibration`.*shape"):
        to_int8(model, example_inputs=x, calibration=[torch.randn(3, 5)])
    with pytest.raises(ValueError, match="at least one batch"):
        to_int8(model, example_inputs=x, calibration=[])
    with pytest.raises(ValueError, match="1 input"):
        to_int8(model, example_inputs=x, calibration=[(x, x)])
    with pytest.raises(TypeError, match="`calibration`"):
        to_int8(model, example_inputs=x, calibration=[[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"`calibration`.*shape"):
        export_onnx(model, example_inputs=x, path=tmp_path / "m.onnx", calibration=[torch.randn(3, 5)])
    assert not (tmp_path / "m.onnx").exists()
    int8_model = to_int8(model, example_inputs=x, calibration=(b for b in data()))  # a generator is fine
    assert_int8_close(int8_model(x), reference(model, x))
