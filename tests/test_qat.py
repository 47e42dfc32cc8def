"""QuantizationAwareTraining and its fake-quant math."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compress_callbacks import CompressionManager, GradualMagnitudePruning, QuantizationAwareTraining
from compress_callbacks.quantization import fake_quant as FQ
from compress_callbacks.quantization.grid import bn_fold_factor
from compress_callbacks.quantization.spec import get_qparams, quantize_weight, weight_qmax


# ------------------------------------------------------------------------------------ helpers
def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 4),
    )


def batches(n: int, shape=(8, 12), classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g)) for _ in range(n)]


def train(model, optimizer, data):
    for x, y in data:
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()


def attach(model, lr=0.05, **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    qat = QuantizationAwareTraining(**kwargs)
    manager = CompressionManager(qat)
    manager.attach(model, optimizer)
    return manager, qat, optimizer


# ------------------------------------------------------------------------------------ pure math
@pytest.mark.parametrize("bits", range(2, 9))
def test_weight_fake_quant_grid_range_and_straight_through(bits):
    w = torch.randn(6, 5, 3, requires_grad=True)
    out = FQ.fake_quantize_weight(w, bits)
    scale = FQ.per_channel_weight_scale(w, bits).reshape(-1, 1, 1)
    codes = out.detach() / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().abs().amax() == weight_qmax(bits)  # the channel max lands on the top code
    assert (out.detach() - w.detach()).abs().le(scale / 2 * (1 + 1e-5)).all()  # rounding only, nothing clipped
    grad = torch.randn_like(w)
    out.backward(grad)
    assert torch.equal(w.grad, grad)


def test_weight_fake_quant_zero_channel_and_zeros_stay_zero():
    w = torch.tensor([[0.0, 0.0], [0.0, 0.7]])
    out = FQ.fake_quantize_weight(w, 4)
    assert out[0].eq(0).all() and out[1, 0] == 0 and torch.isfinite(out).all()


def test_activation_fake_quant_matches_aten_values_and_gradient():
    x = (torch.randn(64, 33) * 3).requires_grad_()
    scale, zero_point = FQ.activation_qparams(torch.tensor([-2.0]), torch.tensor([4.5]))
    ours = FQ.fake_quantize_activation(x, scale, zero_point)
    x_ref = x.detach().clone().requires_grad_()
    ref = torch.fake_quantize_per_tensor_affine(x_ref, scale, zero_point, 0, 255)
    assert torch.equal(ours, ref)
    grad = torch.randn_like(x)
    ours.backward(grad)
    ref.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)
    assert x.grad[x.detach() > 4.6].eq(0).all() and (x.grad != 0).any()


def test_activation_qparams_represent_zero_exactly():
    lo, hi = torch.tensor([0.3, -5.0, -1.0]), torch.tensor([2.0, -1.0, 3.0])
    scale, zp = FQ.activation_qparams(lo, hi)
    assert zp.dtype == torch.int32 and zp.tolist()[:2] == [0, 255]
    zero = FQ.fake_quantize_activation(torch.zeros(3), scale, zp)
    assert zero.eq(0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_shape", [(), (1,)])
def test_activation_fake_quant_of_half_inputs_is_the_float32_grid_rounded_once(dtype, scale_shape):
    torch.manual_seed(5)
    x = (torch.randn(4096) * 3).to(dtype).requires_grad_()
    scale, zero_point = torch.tensor(0.03).reshape(scale_shape), torch.tensor(128, dtype=torch.int32).reshape(scale_shape)
    out = FQ.fake_quantize_activation(x, scale, zero_point)
    reference = FQ.fake_quantize_activation(x.detach().float(), scale, zero_point).to(dtype)
    assert out.dtype == dtype and torch.equal(out, reference)
    out.sum().backward()
    inside = (x.detach().float() / 0.03).round().add(128).clamp(0, 255).eq((x.detach().float() / 0.03).round().add(128))
    assert torch.equal(x.grad, inside.to(dtype))


def test_qat_and_pruning_under_cpu_autocast_bf16():
    """Mixed precision: under ``torch.autocast("cpu", bfloat16)`` the layers compute in bf16 on the
    fake-quant grid (weights and inputs quantized in float32, then cast), observers keep float32
    ranges, pruned weights stay exactly zero, and the model in float32 afterwards computes what the
    bf16 run computed, up to bf16 rounding."""
    model = cnn(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    manager = CompressionManager(QuantizationAwareTraining(start_step=2),
                                 GradualMagnitudePruning(0.5, start_step=0, end_step=4, update_every=2))
    manager.attach(model, optimizer)
    data = batches(8, shape=(4, 3, 8, 8), classes=4)
    for x, y in data:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        assert logits.dtype == torch.bfloat16
        F.cross_entropy(logits.float(), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert manager.step == 8
    convs_and_linears = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in convs_and_linears:
        assert layer.weight.dtype == torch.float32
        assert (layer.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    ranges = manager.callbacks[0].ranges  # the observers' input ranges, from which the scales are computed
    assert len(ranges) == len(convs_and_linears)
    assert all(lo.dtype == hi.dtype == torch.float32 and torch.isfinite(torch.stack([lo, hi])).all() for lo, hi in ranges.values())
    model.eval()
    x = data[0][0]
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x).float()
    assert (half - full).abs().max() <= 0.05 * full.abs().max()


def test_bn_fold_math_matches_reference():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 1.5)
    bn.eval()
    x = torch.randn(2, 3, 8, 8)
    factor = bn_fold_factor(bn.weight, bn.running_var, bn.eps)
    w_eff = FQ.fold_bn_fake_quantize_weight(conv.weight, factor, 8)
    ours = bn(F.conv2d(x, w_eff, conv.bias))
    folded_w = FQ.fake_quantize_weight(conv.weight * factor.view(-1, 1, 1, 1), 8)
    folded_b = (conv.bias - bn.running_mean) * factor + bn.bias
    assert torch.allclose(ours, F.conv2d(x, folded_w, folded_b), atol=1e-5)


# ------------------------------------------------------------------------------------ callback
def test_bit_exact_before_start_step_then_active():
    data = batches(6)
    plain, with_qat = mlp(), mlp()
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    manager, qat, opt = attach(with_qat, start_step=4)
    for step, (x, y) in enumerate(data):
        out_a, out_b = plain(x), with_qat(x)
        if step < 4:
            assert torch.equal(out_a, out_b)
            assert type(with_qat[0]) is nn.Linear and not with_qat[0]._forward_pre_hooks
        else:
            assert type(with_qat[0]).__name__ == "QATLinear" and not torch.equal(out_a, out_b)
        for model, o, out in ((plain, opt_plain, out_a), (with_qat, opt, out_b)):
            F.cross_entropy(out, y).backward()
            o.step()
            o.zero_grad()
    assert qat.log_values()["active"] == 1.0


def test_same_parameters_stay_in_optimizer_and_state_dict_keys_unchanged():
    model = mlp()
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    manager, qat, opt = attach(model)
    assert [id(p) for p in model.parameters()] == params
    assert [id(p) for p in opt.param_groups[0]["params"]] == params
    assert list(model.state_dict()) == keys
    train(model, opt, batches(2))
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weight_bits": 1}, "weight_bits"),
        ({"weight_bits": 9}, "weight_bits"),
        ({"weight_bits": True}, "weight_bits"),
        ({"weight_bits": 8.0}, "weight_bits"),
        ({"activation_bits": 4}, "activation_bits"),
        ({"activation_bits": 16}, "activation_bits"),
        ({"start_step": -1}, "start_step"),
        ({"freeze_observers_step": -2}, "freeze_observers_step"),
        ({"freeze_bn_step": 1.5}, "freeze_bn_step"),
        ({"modules": [3]}, "modules"),
        ({"exclude": "re:("}, "exclude"),
    ],
)
def test_bad_arguments_raise_in_init(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        QuantizationAwareTraining(**kwargs)


@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (lambda: nn.Sequential(nn.LayerNorm(4)), {}, "matched no module"),
        (mlp, {"modules": ["nope"]}, "matches no module"),
        # (an nn.Embedding named in `modules` is supported since issue 16: tests/test_qat_lm.py)
        (lambda: nn.Sequential(nn.EmbeddingBag(5, 4), nn.Linear(4, 2)), {"modules": ["0", "1"]}, "supports nn.Linear"),
    ],
)
def test_bad_model_raises_before_anything_is_touched(make, kwargs, match):
    model = make()
    before = copy.deepcopy(model.state_dict())
    types = [type(m) for m in model.modules()]
    manager = CompressionManager(QuantizationAwareTraining(**kwargs))
    with pytest.raises(ValueError, match=match):
        manager.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_optimizer_must_own_weights():
    model = mlp()
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer"):
        CompressionManager(QuantizationAwareTraining()).attach(model, optimizer)
    assert type(model[2]) is nn.Linear


def test_observers_track_then_freeze():
    model = mlp()
    manager, qat, opt = attach(model, freeze_observers_step=3)
    data = batches(6)
    ranges = []
    for batch in data:
        train(model, opt, [batch])
        state = qat.state_dict()
        ranges.append((state["running_min"].clone(), state["running_max"].clone()))
    assert not torch.equal(ranges[1][1], ranges[2][1])  # still moving before step 3
    for lo, hi in ranges[3:]:  # the range of step 3 stays
        assert torch.equal(lo, ranges[2][0]) and torch.equal(hi, ranges[2][1])
    assert qat.log_values()["observers_frozen"] == 1.0
    # eval forwards never move the ranges
    model.eval()
    model(torch.randn(4, 12) * 100)
    assert torch.equal(qat.state_dict()["running_max"], ranges[-1][1])


def test_moving_average_update_per_real_update():
    model = nn.Sequential(nn.Linear(2, 1))
    manager, qat, opt = attach(model)
    first = torch.tensor([[0.0, 1.0]])
    model(first).sum().backward(); opt.step(); opt.zero_grad()
    state = qat.state_dict()
    assert state["running_min"].item() == 0.0 and state["running_max"].item() == 1.0
    model(torch.tensor([[-1.0, 3.0]])).sum().backward(); opt.step(); opt.zero_grad()
    c = QuantizationAwareTraining.averaging_constant
    assert qat.state_dict()["running_max"].item() == pytest.approx(1.0 + c * (3.0 - 1.0))
    assert qat.state_dict()["running_min"].item() == pytest.approx(-c)


def test_freeze_bn_keeps_statistics_even_after_train():
    model = cnn()
    manager, qat, opt = attach(model, freeze_bn_step=2)
    data = batches(5, shape=(4, 3, 8, 8), classes=4)
    train(model, opt, data[:2])
    bn = model[1]
    assert not bn.training
    mean = bn.running_mean.clone()
    model.train()
    assert not bn.training and model[0].training
    train(model, opt, data[2:])
    assert torch.equal(bn.running_mean, mean)
    manager.finalize(model)
    assert type(bn) is nn.BatchNorm2d and bn.training  # restored, following the model's mode


def test_bn_folded_training_forward_matches_folded_conv_reference():
    model = cnn()
    manager, qat, opt = attach(model, freeze_bn_step=0, activation_bits=None)
    train(model, opt, batches(2, shape=(4, 3, 8, 8), classes=4))
    conv, bn = model[0], model[1]
    assert qat.summary_rows()[0]["folded_bn"] == "1"
    x = torch.randn(2, 3, 8, 8)
    factor = bn_fold_factor(bn.weight, bn.running_var, bn.eps).detach()
    folded_w = FQ.fake_quantize_weight(conv.weight.detach() * factor.view(-1, 1, 1, 1), 8)
    folded_b = (conv.bias.detach() - bn.running_mean) * factor + bn.bias.detach()
    with torch.no_grad():
        assert torch.allclose(model[1](model[0](x)), F.conv2d(x, folded_w, folded_b, padding=1), atol=1e-5)


def test_bn_pairing_is_checked_at_runtime():
    class ConvReluBn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(torch.relu(self.conv(x)))

    model = ConvReluBn()
    manager, qat, opt = attach(model)
    assert qat.summary_rows()[0]["folded_bn"] == "bn"
    with pytest.warns(UserWarning, match="does not consume"):
        model(torch.randn(2, 3, 6, 6))
    assert qat.summary_rows()[0]["folded_bn"] == "-"
    assert not model.bn._forward_pre_hooks


def test_pruning_and_qat_keep_zeros_through_fake_quant_and_finalize():
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gmp = GradualMagnitudePruning(target_sparsity=0.5, start_step=0, end_step=4, update_every=2)
    qat = QuantizationAwareTraining(start_step=1, weight_bits=4)
    manager = CompressionManager(gmp, qat)
    manager.attach(model, optimizer)
    train(model, optimizer, batches(6))
    for layer in (model[0], model[2], model[4]):
        zeros = layer.weight == 0
        assert zeros.float().mean() == pytest.approx(0.5, abs=0.02)
        assert FQ.fake_quantize_weight(layer.weight, 4)[zeros].eq(0).all()
    zeros_before = [layer.weight.eq(0) for layer in (model[0], model[2], model[4])]
    manager.finalize(model)
    for (name, spec), zeros in zip(sorted(get_qparams(model).items()), zeros_before):
        weight = model.get_submodule(name).weight
        assert torch.equal(weight.eq(0), zeros)
        assert quantize_weight(weight, spec)[zeros].eq(0).all()


@pytest.mark.parametrize("make, shape, classes", [(mlp, (8, 12), 3), (cnn, (4, 3, 8, 8), 4)])
def test_finalize_snaps_to_grid_and_loads_strictly_into_fresh_copy(make, shape, classes):
    model = make()
    fresh = make(seed=123)
    manager, qat, opt = attach(model, freeze_bn_step=3, weight_bits=4)
    train(model, opt, batches(5, shape=shape, classes=classes))
    model.eval()
    x = torch.randn(*shape)
    # the trained model without input fake-quant, what the float finalized model must compute: the
    # trained weights and BatchNorm statistics under a weight-only QAT (the same weight fake-quant)
    weight_only = copy.deepcopy(fresh)
    weight_only.load_state_dict(model.state_dict())
    attach(weight_only, activation_bits=None, freeze_bn_step=0, weight_bits=4)
    with torch.no_grad():
        expected = weight_only.eval()(x)
    compressed = manager.finalize(model)
    assert compressed is model
    for m, plain in zip(compressed.modules(), fresh.modules()):
        assert type(m).__module__.startswith("torch.nn"), type(m)
        assert not m._forward_hooks and not m._forward_pre_hooks
        # nothing left behind on the modules (the root carries the specs export reads)
        assert vars(m).keys() - vars(plain).keys() <= ({"compress_qparams"} if m is compressed else set())
    fresh.load_state_dict(compressed.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), compressed(x))
        assert torch.allclose(compressed(x), expected, atol=1e-5)
    specs = get_qparams(compressed)
    for name, spec in specs.items():
        layer = compressed.get_submodule(name)
        weight = layer.weight.detach()
        if spec.bn:
            bn = compressed.get_submodule(spec.bn)
            weight = weight * bn_fold_factor(bn.weight, bn.running_var, bn.eps).detach().view(-1, 1, 1, 1)
        codes = quantize_weight(weight, spec)
        assert codes.abs().max() <= weight_qmax(4)
        recon = codes.float() * spec.weight_scale.view((-1,) + (1,) * (weight.dim() - 1))
        assert torch.allclose(recon, weight, atol=1e-6, rtol=1e-5)
        assert spec.input_scale > 0 and 0 <= spec.input_zero_point <= 255
    if make is cnn:
        assert specs["0"].bn == "1" and specs["3"].bn == "4" and specs["7"].bn is None


def test_finalize_before_start_warns_and_gives_weight_only_spec():
    model = mlp()
    manager, qat, opt = attach(model, start_step=100)
    train(model, opt, batches(2))
    with pytest.warns(UserWarning, match="never saw an input"):
        manager.finalize(model)
    assert all(spec.weight_only for spec in get_qparams(model).values())


def test_state_dict_resume_is_exact():
    data = batches(8)

    def run(model, manager_state=None, model_state=None, opt_state=None, steps=data):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        manager = CompressionManager(QuantizationAwareTraining(start_step=2, freeze_observers_step=6))
        if manager_state is not None:
            model.load_state_dict(model_state)
            optimizer.load_state_dict(opt_state)
            manager.load_state_dict(manager_state)
        manager.attach(model, optimizer)
        train(model, optimizer, steps)
        return manager, optimizer

    full = mlp()
    run(full)
    half = mlp()
    manager, optimizer = run(half, steps=data[:4])
    buffer = io.BytesIO()
    torch.save({"m": manager.state_dict(), "model": half.state_dict(), "opt": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain tensors and numbers only
    resumed_model = mlp(seed=7)
    run(resumed_model, saved["m"], saved["model"], saved["opt"], steps=data[4:])
    for a, b in zip(full.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)


def test_summary_and_log_values():
    model = cnn()
    manager, qat, opt = attach(model, activation_bits=None)
    values = qat.log_values()
    assert {k: values[k] for k in ("active", "observers_frozen", "bn_frozen")} == {"active": 1.0, "observers_frozen": 0.0, "bn_frozen": 0.0}
    errors = {name: values[f"layer/{name}/weight_error"] for name in ("0", "3", "7")}
    assert all(0.0 < e < 0.01 for e in errors.values()) and values["weight_error/max"] == max(errors.values())
    assert not any("input_" in key for key in values)  # weight-only: no input ranges
    rows = qat.summary_rows()
    assert [r["module"] for r in rows] == ["0", "3", "7"] and rows[0]["input_bits"] == "-"
    assert [r["weight_error"] for r in rows] == list(errors.values())
    assert "QuantizationAwareTraining" in manager.summary()
    assert QuantizationAwareTraining(start_step=5).config()["start_step"] == 5


# ------------------------------------------------------------------------------------ DDP
def _ddp_worker():
    import torch.distributed as dist
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [id(p) for p in model.parameters()]
    qat = QuantizationAwareTraining(start_step=1, freeze_bn_step=3)
    manager = CompressionManager(qat, accelerator=accelerator)
    manager.attach(model, optimizer)
    assert [id(p) for p in model.parameters()] == params
    g = torch.Generator().manual_seed(100 + accelerator.process_index)  # different data per rank
    for _ in range(4):
        x = torch.randn(4, 3, 8, 8, generator=g) * (1 + accelerator.process_index)
        y = torch.randint(0, 4, (4,), generator=g)
        loss = F.cross_entropy(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    state = qat.state_dict()
    local = torch.cat([state["running_min"], state["running_max"]])
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    assert torch.equal(gathered[0], gathered[1]), gathered
    assert (local != 0).any()
    compressed = manager.finalize(model)
    scales = torch.cat([spec.weight_scale for spec in get_qparams(compressed).values()])
    all_scales = [torch.zeros_like(scales) for _ in range(2)]
    dist.all_gather(all_scales, scales)
    assert torch.equal(all_scales[0], all_scales[1])


def test_ddp_two_processes_agree_on_ranges(launch_two_processes):
    launch_two_processes(_ddp_worker, timeout=240)


def _fsdp2_worker(path):
    """Two ranks, FSDP2 (``fully_shard``, gloo), QAT + pruning on a conv + BN model, the same batches
    on both ranks: training, finalize and the exported specs equal a single process's."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from compress_callbacks.quantization.spec import set_qparams

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    reference = cnn(4)
    model = copy.deepcopy(reference)
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            fully_shard(layer)
    fully_shard(model)

    def callbacks():
        return (QuantizationAwareTraining(start_step=1, freeze_bn_step=5),
                GradualMagnitudePruning(0.5, start_step=0, end_step=4, update_every=2))

    managers = []
    for net in (model, reference):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        manager = CompressionManager(*callbacks())
        manager.attach(net, optimizer)
        managers.append((manager, optimizer))
    for x, y in batches(7, shape=(4, 3, 8, 8), classes=4):
        for net, (_, optimizer) in zip((model, reference), managers):
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    whole = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    assert all(torch.allclose(whole[k], v, atol=1e-6) for k, v in reference.state_dict().items())
    finalized, expected = managers[0][0].finalize(model), managers[1][0].finalize(reference)
    whole = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in finalized.state_dict().items()}
    assert all(torch.allclose(whole[k], v, atol=1e-6) for k, v in expected.state_dict().items())
    specs, expected_specs = get_qparams(finalized), get_qparams(expected)
    assert specs.keys() == expected_specs.keys()
    for name, spec in specs.items():
        assert torch.allclose(spec.weight_scale, expected_specs[name].weight_scale)
        assert (spec.input_scale, spec.input_zero_point, spec.bn) == (
            expected_specs[name].input_scale, expected_specs[name].input_zero_point, expected_specs[name].bn)
    # a plain copy from the gathered state dict + the specs is the model to export
    plain = cnn(4)
    plain.load_state_dict(whole)
    set_qparams(plain, specs)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), expected.eval()(x), atol=1e-5)
    with open(f"{path}/rank{dist.get_rank()}.txt", "w") as f:
        f.write("ok")


def test_fsdp2_qat_and_pruning_match_a_single_process(tmp_path, launch_two_processes):
    launch_two_processes(_fsdp2_worker, tmp_path)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["ok", "ok"]


def test_finalized_specs_reproduce_the_fake_quant_model_for_export():
    from compress_callbacks.quantization.ptq import fake_quantized

    model = cnn()
    manager, qat, opt = attach(model, freeze_bn_step=2, freeze_observers_step=3)
    train(model, opt, batches(4, shape=(4, 3, 8, 8), classes=4))
    model.eval()
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        trained = model(x)  # weights and inputs fake-quantized, BN folded
        manager.finalize(model)
        with fake_quantized(model):  # export's reference: the specs applied to the float model
            reference = model(x)
    assert torch.allclose(trained, reference, atol=1e-4), (trained - reference).abs().max()


def test_pruned_all_zero_channel_gets_unit_scale():
    from compress_callbacks.quantization.fake_quant import per_channel_weight_scale

    w = torch.randn(3, 5)
    w[1] = 0.0
    scale = per_channel_weight_scale(w, 8)
    assert scale[1] == 1.0
    assert torch.allclose(scale[[0, 2]], w[[0, 2]].abs().amax(1) / 127)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_native_weight_fake_quant_is_bit_identical_to_the_torch_ops(bits, monkeypatch):
    from compress_callbacks import _native

    kernel = _native.fake_quantize_rows_kernel()
    assert (kernel is not None) == (_native.c_compiler() is not None)  # without a compiler: the fallback
    g = torch.Generator().manual_seed(bits)
    weight = torch.randn(33, 3, 5, 5, generator=g)
    weight[0] = 0.0  # an all-zero (pruned) channel: scale 1.0
    weight[1, :, 0, 0] = -0.0
    qmax = 2 ** (bits - 1) - 1
    weight[2] = torch.arange(75, dtype=torch.float32).reshape(3, 5, 5).sub(37).mul(0.5)  # exact .5 ties
    weight[2, 0, 0, 0] = 37.0 / qmax * qmax  # max |w| sets the scale
    scale = FQ.per_channel_weight_scale(weight, bits)
    native = FQ.fake_quantize_weight_with_scale(weight, scale)
    monkeypatch.setenv("COMPRESS_CALLBACKS_NATIVE", "0")
    reference = FQ.fake_quantize_weight_with_scale(weight, scale)
    assert torch.equal(native, reference)
    assert torch.equal(torch.signbit(native), torch.signbit(reference))  # torch.round keeps -0.0
    assert native.shape == weight.shape and native.is_contiguous()


def test_native_activation_fake_quant_matches_the_torch_ops_values_and_gradient(monkeypatch):
    from compress_callbacks import _native

    assert (_native.activation_kernels() is not None) == (_native.c_compiler() is not None)  # else the fallback
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70_001, generator=g) * 3  # above the OpenMP threshold
    x[:8] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, -0.0, 0.05, -0.05])
    x[8:20] = torch.arange(12, dtype=torch.float32).sub(6).mul(0.05)  # ties of round-half-even at scale 0.1
    scale, zero_point = torch.tensor(0.1), torch.tensor(40, dtype=torch.int32)
    results = []
    for native in ("1", "0"):
        monkeypatch.setenv("COMPRESS_CALLBACKS_NATIVE", native)
        leaf = x.clone().requires_grad_(True)
        out = FQ.fake_quantize_activation(leaf, scale, zero_point)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        out.backward(grad_out)
        results.append((out.detach(), leaf.grad))
    (native_out, native_grad), (torch_out, torch_grad) = results
    assert torch.equal(native_out[1:], torch_out[1:]) and native_out[0].isnan() == torch_out[0].isnan()
    assert torch.equal(native_grad, torch_grad)


def test_compiled_qat_model_matches_eager():
    """Under torch.compile the fake-quant uses torch ops (the native kernels would break the graph)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    manager, qat, optimizer = attach(model, start_step=0)
    train(model, optimizer, [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(3)])
    model.eval()
    x = torch.randn(8, 16)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager)
