"""QAT and calibration on real input: non-finite values, empty batches under DDP, Transformer
layers, two techniques of one kind on the same layers (issue 14, "Quantization")."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compress_callbacks import CompressionManager, QuantizationAwareTraining
from compress_callbacks.quantization import fake_quant as FQ
from compress_callbacks.quantization import observer
from compress_callbacks.quantization.ptq import calibrate
from compress_callbacks.quantization.spec import get_qparams

INF, NAN = float("inf"), float("nan")


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


def batches(n: int, rows: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 12, generator=g), torch.randint(0, 3, (rows,), generator=g)) for _ in range(n)]


def attach_qat(model: nn.Module, lr: float = 0.01, **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    qat = QuantizationAwareTraining(**kwargs)
    manager = CompressionManager(qat)
    manager.attach(model, optimizer)
    return manager, qat, optimizer


def finite_extremes(x: torch.Tensor) -> tuple[float, float]:
    finite = x[torch.isfinite(x)]
    return finite.min().item(), finite.max().item()


# ------------------------------------------------------------------------------------ non-finite
@pytest.mark.parametrize("without_host_sync", [False, True], ids=["cpu-check", "masked"])
def test_tensor_range_keeps_the_finite_values_only(without_host_sync, monkeypatch):
    if without_host_sync:  # the path taken off the CPU and under torch.compile
        monkeypatch.setattr(observer, "_compiling", lambda: True)
    x = torch.tensor([[0.5, -2.0, INF], [NAN, 3.0, -INF]])
    assert [t.item() for t in observer.tensor_range(x)] == [-2.0, 3.0]
    assert [t.item() for t in observer.tensor_range(torch.tensor([NAN, INF, -INF]))] == [INF, -INF]
    clean = torch.randn(5, 7)
    assert [t.item() for t in observer.tensor_range(clean)] == [clean.min().item(), clean.max().item()]


def test_an_overflowed_input_never_enters_a_range_first_batch_included():
    model = mlp()
    _, qat, optimizer = attach_qat(model)
    data = batches(6)
    first, later = data[0][0].clone(), data[3][0].clone()
    first[0, 0], first[1, 3] = INF, -INF
    later[2, 5] = INF
    data[0], data[3] = (first, data[0][1]), (later, data[3][1])
    for i, (x, y) in enumerate(data):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if i == 0:  # a first observation is taken as it is: the first batch's finite extremes
            low, high = qat.ranges["0"]
            assert (low.item(), high.item()) == finite_extremes(first)
    for name, (low, high) in qat.ranges.items():
        assert torch.isfinite(low) and torch.isfinite(high), (name, low, high)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(model(batches(1, seed=5)[0][0])).all()


def test_a_batch_without_a_finite_value_leaves_every_range_as_it_was():
    model = mlp()
    _, qat, optimizer = attach_qat(model)
    poison = torch.full((8, 12), NAN)
    poison[:4] = INF
    poison[4:6] = -INF
    model(poison)  # first batch: no range can start from it, its inputs pass float
    optimizer.step()
    assert dict(qat.ranges) == {}
    clean = batches(1)[0][0]
    model(clean)
    optimizer.step()
    low, high = qat.ranges["0"]
    assert (low.item(), high.item()) == finite_extremes(clean)
    before = {name: (low.clone(), high.clone()) for name, (low, high) in qat.ranges.items()}
    model(torch.full((8, 12), NAN))  # a later one (NaN all the way through the model): nothing moves
    optimizer.step()
    after = dict(qat.ranges)
    assert after.keys() == before.keys() == {"0", "2", "4"}
    for name, (low, high) in before.items():
        assert torch.equal(after[name][0], low) and torch.equal(after[name][1], high), name


def test_calibrate_skips_non_finite_values():
    model = mlp().eval()
    data = [x.clone() for x, _ in batches(3)]
    data[0][0, :3] = torch.tensor([INF, -INF, NAN])
    data[2][4, 7] = INF
    low, high = finite_extremes(torch.cat(data))
    spec = get_qparams(calibrate(model, data))["0"]
    scale, zero_point = FQ.activation_qparams(torch.tensor(low), torch.tensor(high))
    assert (spec.input_scale, spec.input_zero_point) == (float(scale), int(zero_point))


# ------------------------------------------------------------------------------------ Transformer layers
INT8_TOLERANCE = 0.01  # of max |reference output|, as in test_export


class Attention(nn.Module):
    """A bare nn.MultiheadAttention (its out_proj is never called) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


class Encoder(nn.Module):
    """Two nn.TransformerEncoderLayer (batch_first: eligible for PyTorch's fused eval path) and a head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.enc(x, src_key_padding_mask=padding).mean(1))


def test_multihead_attention_out_proj_is_left_out_with_a_warning_and_refused_by_name():
    torch.manual_seed(0)
    model = Attention()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match=r"'attn\.out_proj'.*MultiheadAttention"):
        CompressionManager(QuantizationAwareTraining(modules=["attn.out_proj", "head"])).attach(model, optimizer)
    assert [type(m) for m in model.modules()] == [Attention, nn.MultiheadAttention, type(model.attn.out_proj), nn.Linear]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for modules in (None, nn.Linear, "re:.*"):  # selected by default, by type or by a regex: left out, with a warning
        qat = QuantizationAwareTraining(modules=modules)
        manager = CompressionManager(qat)
        with pytest.warns(UserWarning, match=r"attn\.out_proj"):
            manager.attach(model, optimizer)
        assert [name for name, _ in qat.target_modules(model)] == ["head"]
        with pytest.warns(UserWarning, match="never saw an input"):  # no forward ran
            manager.finalize(model)
    with pytest.raises(ValueError, match="out_proj"):  # nothing else to quantize
        CompressionManager(QuantizationAwareTraining(modules="re:.*out_proj")).attach(model, optimizer)
    with pytest.warns(UserWarning, match=r"calibrate: leaving out \['attn\.out_proj'\]"):  # post-training alike
        calibrated = calibrate(model.eval(), [torch.randn(4, 5, 16)])
    assert set(get_qparams(calibrated)) == {"head"}


@pytest.mark.parametrize("make", [Attention, Encoder])
def test_transformer_layers_train_finalize_and_convert_to_int8(make, recwarn):
    from compress_callbacks.export import to_int8
    from compress_callbacks.export.inductor import _int8_layers_copy
    from compress_callbacks.quantization.ptq import fake_quantized

    torch.manual_seed(0)
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    qat = QuantizationAwareTraining(start_step=0)
    manager = CompressionManager(qat)
    manager.attach(model, optimizer)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        F.cross_entropy(model(torch.randn(4, 5, 16, generator=g)), torch.randint(0, 3, (4,), generator=g)).backward()
        optimizer.step()
        optimizer.zero_grad()
    x = torch.randn(2, 5, 16, generator=g)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    inputs = (x, padding) if make is Encoder else (x,)
    model.eval()
    module_path = model(*inputs)  # grad enabled: PyTorch's module path, every fake-quantized layer runs
    with torch.no_grad():  # eligible for the fused eval path, which would compute those layers in float
        assert torch.allclose(model(*inputs), module_path, atol=1e-5)
    expected = {"head"} if make is Attention else {"head"} | {f"enc.layers.{i}.linear{j}" for i in range(2) for j in (1, 2)}
    assert set(qat.ranges) == expected
    finalized = manager.finalize(model)
    assert set(get_qparams(finalized)) == expected
    assert not [w for w in recwarn if "never saw an input" in str(w.message)]
    assert [type(m) for m in finalized.modules()] == [type(m) for m in make().modules()]
    with torch.no_grad(), fake_quantized(finalized):
        reference = finalized(x)
    int8 = to_int8(finalized, example_inputs=x)  # ONNX Runtime
    with torch.no_grad():
        assert (int8(x) - reference).abs().max() <= INT8_TOLERANCE * reference.abs().max()
        # the Inductor path's layers, run eagerly (compiling them is what to_int8(backend="inductor") adds)
        assert torch.allclose(_int8_layers_copy(finalized)(x), reference, atol=1e-5)


# ------------------------------------------------------------------------------------ one kind, one layer
def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
    """What an attach could have touched: module classes and attributes, weights, optimizer hooks."""
    return ([(name, type(m), sorted(m.__dict__)) for name, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            (len(optimizer._optimizer_step_pre_hooks), len(optimizer._optimizer_step_post_hooks)))


def assert_unchanged(before: tuple, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    after = snapshot(model, optimizer)
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1].keys() == before[1].keys() and all(torch.equal(after[1][k], v) for k, v in before[1].items())


@pytest.mark.parametrize("kind", ["qat", "gmp"])
def test_two_callbacks_of_one_kind_on_the_same_layers_are_refused_before_anything_is_touched(kind):
    from compress_callbacks import GradualMagnitudePruning

    def make(**kwargs):
        if kind == "qat":
            return QuantizationAwareTraining(start_step=0, **kwargs)
        return GradualMagnitudePruning(target_sparsity=0.5, start_step=0, end_step=4, update_every=2, **kwargs)

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = snapshot(model, optimizer)
    name = type(make()).__name__
    for first, second, named in (({}, {}, "'0', '2', '4'"), ({"modules": ["0", "2"]}, {"modules": "re:[24]"}, "'2'")):
        manager = CompressionManager(make(**first), make(**second))
        with pytest.raises(ValueError, match=rf"{name} #0 and #1 both target {named};"):
            manager.attach(model, optimizer)
        assert not manager.attached
        assert_unchanged(before, model, optimizer)
    model[2].weight = model[0].weight = nn.Parameter(torch.randn(32, 12))  # one weight, two layers
    model[2].in_features = 12
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=r"both target '2' \(its weight is '0''s\)"):
        CompressionManager(make(modules=["0"]), make(modules=["2"])).attach(model, optimizer)
    assert_unchanged(before, model, optimizer)


def test_two_quantization_callbacks_on_disjoint_layers_train_together():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    four_bits = QuantizationAwareTraining(weight_bits=4, modules=["0", "2"])
    manager = CompressionManager(four_bits, QuantizationAwareTraining(weight_bits=8, exclude=["0", "2"]))
    manager.attach(model, optimizer)
    for x, y in batches(3):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    specs = get_qparams(manager.finalize(model))
    assert {name: spec.weight_bits for name, spec in specs.items()} == {"0": 4, "2": 4, "4": 8}
    assert all(spec.input_scale is not None for spec in specs.values())


# ------------------------------------------------------------------------------------ DDP
def _ddp_ranks_agree_worker(path):
    """Two ranks, different data. "empty": rank 1's batch has no rows at the first and third steps
    (every rank still takes part in the range reduction). "frozen": observers frozen before QAT starts
    (the ranges start from each rank's first batch and are agreed on before they freeze)."""
    import torch.distributed as dist
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    for scenario, kwargs in (("empty", {"start_step": 0}), ("frozen", {"start_step": 1, "freeze_observers_step": 0})):
        model = mlp()
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01))
        qat = QuantizationAwareTraining(**kwargs)
        manager = CompressionManager(qat, accelerator=accelerator)
        manager.attach(model, optimizer)
        g = torch.Generator().manual_seed(100 + rank)
        first_active = None
        for step in range(5):
            rows = 0 if scenario == "empty" and rank == 1 and step in (0, 2) else 8
            x, y = torch.randn(rows, 12, generator=g) * (1 + 3 * rank), torch.randint(0, 3, (rows,), generator=g)
            if first_active is None and step >= kwargs["start_step"] and rows:
                first_active = x
            accelerator.backward(F.cross_entropy(model(x), y, reduction="sum"))
            optimizer.step()
            optimizer.zero_grad()
        state = qat.state_dict()
        local = torch.cat([state["running_min"], state["running_max"], torch.tensor(state["initialized"], dtype=torch.float32)])
        gathered = [torch.zeros_like(local) for _ in range(2)]
        dist.all_gather(gathered, local)
        assert torch.equal(gathered[0], gathered[1]), (scenario, gathered)
        assert all(state["initialized"]) and (state["running_max"] > 0).all(), (scenario, state)
        if scenario == "frozen":  # the union of the two ranks' first active batches, then fixed
            low, high = first_active.min().reshape(1), first_active.max().reshape(1)
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            assert (state["running_min"][0], state["running_max"][0]) == (low[0], high[0]), (state, low, high)
        specs = get_qparams(manager.finalize(model))
        scales = torch.tensor([[spec.input_scale, spec.input_zero_point] for spec in specs.values()])
        all_scales = [torch.zeros_like(scales) for _ in range(2)]
        dist.all_gather(all_scales, scales)
        assert torch.equal(all_scales[0], all_scales[1]), (scenario, all_scales)
    with open(f"{path}/rank{rank}.txt", "w") as f:
        f.write("ok")


def test_ddp_ranks_agree_with_an_empty_batch_and_with_observers_frozen_before_the_start(tmp_path, launch_two_processes):
    launch_two_processes(_ddp_ranks_agree_worker, tmp_path, timeout=180)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["ok", "ok"]
