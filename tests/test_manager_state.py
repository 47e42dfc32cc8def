"""The manager's state: atomic attach and resume, the plan stored in checkpoints, models that
pickle and copy cheaply while training."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn

from compress_callbacks import CompressionManager, GradualMagnitudePruning, QuantizationAwareTraining
from compress_callbacks.quantization.qat import STATE_ATTR


def make_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4),
    )


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 6, 6, generator=g)


def gmp(**overrides):
    options = dict(target_sparsity=0.5, start_step=0, end_step=4, update_every=1)
    return GradualMagnitudePruning(**{**options, **overrides})


def qat(**overrides):
    return QuantizationAwareTraining(**{"start_step": 1, **overrides})


def train(model, optimizer, steps, seed=0):
    for i in range(steps):
        model(batch(seed + i)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def trained(steps=3, seed=0, **plan):
    """A CNN trained ``steps`` updates under GMP + QAT; returns model, optimizer, manager."""
    model = make_cnn(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    manager = CompressionManager(gmp(**plan.get("gmp", {})), qat(**plan.get("qat", {})))
    manager.attach(model, optimizer)
    train(model, optimizer, steps)
    return model, optimizer, manager


def snapshot(model, optimizer, manager):
    """Everything attach / load_state_dict could change, in comparable form."""
    real = manager.optimizer or optimizer
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(name, type(m), sorted(m.__dict__), len(m._forward_hooks), len(m._forward_pre_hooks))
                    for name, m in model.named_modules()],
        "param_hooks": [len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "optimizer": copy.deepcopy(real.state_dict()),
        "optimizer_hooks": (len(real._optimizer_step_pre_hooks), len(real._optimizer_step_post_hooks)),
        "manager": (manager.attached, manager.step, manager.hooked, len(manager._handles), manager._pending_state is None,
                    [cb.manager for cb in manager.callbacks]),
        "callback_state": [_plain(cb.state_dict()) for cb in manager.callbacks],
    }


def _plain(value):
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def assert_same(before, after):
    assert before.keys() == after.keys()
    for key in before:
        if key == "weights":
            assert before[key].keys() == after[key].keys()
            for name in before[key]:
                assert torch.equal(before[key][name], after[key][name]), name
        elif key == "grads":
            assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(before[key], after[key]))
        elif key == "optimizer":
            assert _plain(before[key]) == _plain(after[key])
        else:
            assert before[key] == after[key], key


# ------------------------------------------------------------------------------ atomic attach
def test_attach_with_a_pending_state_that_does_not_fit_changes_nothing():
    _, _, source = trained()
    state = source.state_dict()
    state["callbacks"]["1:QuantizationAwareTraining"]["names"] = ["0", "4", "missing"]  # QAT part does not fit

    model = make_cnn(seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, optimizer, 1)  # optimizer state and gradients exist
    model(batch()).sum().backward()
    manager = CompressionManager(gmp(), qat())
    manager.load_state_dict(state)
    before = snapshot(model, optimizer, manager)
    with pytest.raises(ValueError, match="missing"):
        manager.attach(model, optimizer)
    assert_same(before, snapshot(model, optimizer, manager))  # GMP (first) did not install its masks either

    good = source.state_dict()
    manager.load_state_dict(good)  # the user fixes the state: attach now works
    manager.attach(model, optimizer)
    assert manager.attached and manager.step == 3


def test_attach_with_a_mask_of_the_wrong_shape_changes_nothing():
    _, _, source = trained()
    state = source.state_dict()
    masks = state["callbacks"]["0:GradualMagnitudePruning"]["masks"]
    masks[-1] = masks[-1][:, :-1]
    model = make_cnn(seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    manager = CompressionManager(gmp(), qat())
    manager.load_state_dict(state)
    before = snapshot(model, optimizer, manager)
    with pytest.raises(ValueError, match="shape"):
        manager.attach(model, optimizer)
    assert_same(before, snapshot(model, optimizer, manager))


def test_a_bad_accelerator_is_refused_before_anything_is_installed():
    with pytest.raises(TypeError, match="`accelerator`"):
        CompressionManager(gmp(), accelerator="cpu")
    model = make_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    manager = CompressionManager(gmp(), qat(start_step=0))
    manager.accelerator = object()  # replaced after construction: attach checks it again
    before = snapshot(model, optimizer, manager)
    with pytest.raises(TypeError, match="`accelerator`"):
        manager.attach(model, optimizer)
    assert_same(before, snapshot(model, optimizer, manager))


def test_a_model_on_the_meta_device_is_refused_before_anything_is_installed():
    with torch.device("meta"):
        model = make_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    manager = CompressionManager(gmp(), qat(start_step=0))
    before_classes = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="meta"):
        manager.attach(model, optimizer)
    assert not manager.attached and manager.hooked is False and all(cb.manager is None for cb in manager.callbacks)
    assert [type(m) for m in model.modules()] == before_classes
    assert not any(getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_a_live_load_state_dict_rejected_in_a_later_part_changes_nothing():
    model, optimizer, manager = trained(steps=2)
    _, _, other = trained(steps=4, seed=3)
    state = other.state_dict()
    state["callbacks"]["1:QuantizationAwareTraining"]["bn"] = ["no_such_bn", None, None]
    before = snapshot(model, optimizer, manager)
    with pytest.raises(ValueError, match="no_such_bn"):
        manager.load_state_dict(state)
    assert_same(before, snapshot(model, optimizer, manager))  # step and GMP's masks untouched too

    manager.load_state_dict(other.state_dict())  # a fitting state still loads, live
    assert manager.step == 4
    masks = other.state_dict()["callbacks"]["0:GradualMagnitudePruning"]["masks"]
    assert all(torch.equal(m, manager.callbacks[0].masks[name]) for m, name in zip(masks, manager.callbacks[0].masks))


def test_load_state_dict_refuses_a_state_that_is_not_one():
    model, optimizer, manager = trained(steps=1)
    before = snapshot(model, optimizer, manager)
    state = manager.state_dict()
    for bad in ({"step": -1, "callbacks": state["callbacks"]}, {"step": "3", "callbacks": state["callbacks"]},
                {"step": 1, "callbacks": {"0:GradualMagnitudePruning": {}, "1:QuantizationAwareTraining": {}}}):
        with pytest.raises(ValueError, match="`state`"):
            manager.load_state_dict(bad)
    assert_same(before, snapshot(model, optimizer, manager))


# ------------------------------------------------------------------------------ the plan in the state
@pytest.mark.parametrize(
    "plan, field",
    [
        ({"gmp": {"target_sparsity": 0.75}}, "target_sparsity"),
        ({"gmp": {"granularity": "channel"}}, "granularity"),
        ({"gmp": {"update_every": 2}}, "update_every"),
        ({"gmp": {"end_step": 8}}, "end_step"),
        ({"qat": {"weight_bits": 4}}, "weight_bits"),
    ],
)
def test_resuming_with_another_plan_raises_naming_the_field_unless_allowed(plan, field):
    _, _, source = trained()
    state = source.state_dict()

    model = make_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    manager = CompressionManager(gmp(**plan.get("gmp", {})), qat(**plan.get("qat", {})))
    with pytest.raises(ValueError, match=f"`state`.*{field}.*allow_new_plan"):
        manager.load_state_dict(state)
    assert manager.step == 0 and manager._pending_state is None

    manager.load_state_dict(state, allow_new_plan=True)  # the user opts in: continue with the new plan
    manager.attach(model, optimizer)
    assert manager.step == 3
    train(model, optimizer, 5)
    if "target_sparsity" in plan.get("gmp", {}):
        assert manager.callbacks[0].overall_sparsity() == pytest.approx(0.75, abs=0.01)


def test_a_manager_built_with_allow_new_plan_accepts_another_plan_live():
    _, _, source = trained()
    manager = CompressionManager(gmp(target_sparsity=0.25), qat(), allow_new_plan=True)
    fresh = make_cnn()
    opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    manager.attach(fresh, opt)
    manager.load_state_dict(source.state_dict())  # what accelerator.load_state calls: no keyword
    assert manager.step == 3
    with pytest.raises(ValueError, match="allow_new_plan"):
        CompressionManager(gmp(target_sparsity=0.25), qat()).load_state_dict(source.state_dict())


def test_the_state_holds_the_plan_as_plain_values_and_old_states_without_it_load():
    _, _, source = trained(gmp={"modules": [nn.Linear, "0"]})
    state = source.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["plans"]["0:GradualMagnitudePruning"]["target_sparsity"] == 0.5
    assert loaded["plans"]["0:GradualMagnitudePruning"]["modules"] == ["type:torch.nn.Linear", "0"]

    newer_argument = copy.deepcopy(state)  # saved before an argument existed: it ran with its default
    del newer_argument["plans"]["0:GradualMagnitudePruning"]["mask_gradients"]
    CompressionManager(gmp(modules=[nn.Linear, "0"]), qat()).load_state_dict(newer_argument)
    with pytest.raises(ValueError, match="mask_gradients"):
        CompressionManager(gmp(modules=[nn.Linear, "0"], mask_gradients="step"), qat()).load_state_dict(newer_argument)

    old = {key: value for key, value in state.items() if key != "plans"}  # a checkpoint from before plans
    manager = CompressionManager(gmp(target_sparsity=0.75, modules=[nn.Linear, "0"]), qat())
    manager.load_state_dict(old)
    model = make_cnn()
    manager.attach(model, torch.optim.Adam(model.parameters(), lr=1e-2))
    assert manager.step == 3


# ------------------------------------------------------------------------------ pickling and copies
def test_a_model_under_gmp_and_qat_pickles_mid_training():
    model, optimizer, manager = trained(steps=3)
    assert any(STATE_ATTR in m.__dict__ for m in model.modules())  # fake-quant is live
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    model.eval(), loaded.eval()
    x = batch(9)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))  # the copy fake-quantizes with the ranges it was saved with


def test_a_model_pickled_mid_training_under_the_old_qat_class_paths_loads_back(monkeypatch):
    """The per-layer classes moved from ``qat`` to ``qat_layers``; pickles that name them at
    ``compress_callbacks.quantization.qat`` (QATConv2d, FrozenBatchNorm2d, QATConv1D, _LayerState, ...) load."""
    from transformers.pytorch_utils import Conv1D

    from compress_callbacks.quantization import qat_layers

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 6), Conv1D(5, 6)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    CompressionManager(qat(freeze_bn_step=2)).attach(model, optimizer)
    train(model, optimizer, 3)
    moved = {v for v in vars(qat_layers).values() if isinstance(v, type) and v.__module__ == qat_layers.__name__}
    for cls in moved | set(qat_layers._QAT_CLASSES.values()):  # pickle as an earlier version did
        monkeypatch.setattr(cls, "__module__", "compress_callbacks.quantization.qat")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    monkeypatch.undo()
    assert b"compress_callbacks.quantization.qat_layers" not in buffer.getvalue()
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert [type(m).__name__ for m in loaded] == ["QATConv2d", "FrozenBatchNorm2d", "ReLU", "Flatten", "QATLinear", "QATConv1D"]
    assert type(loaded[0]) is type(model[0]) and type(loaded[5]) is type(model[5])
    model.eval(), loaded.eval()
    x = batch(9)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_deepcopy_mid_training_copies_neither_the_manager_nor_the_optimizer_state():
    model, optimizer, manager = trained(steps=3)
    memo = {}
    ema = copy.deepcopy(model, memo)
    state_tensors = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    assert state_tensors and not any(id(t) in memo for t in state_tensors)
    for obj in (manager, optimizer, *manager.callbacks):
        assert id(obj) not in memo
    model.eval(), ema.eval()
    x = batch(9)
    with torch.no_grad():
        assert torch.equal(ema(x), model(x))
    # training the original goes on with its own callbacks; the copy is a snapshot
    model.train()
    train(model, optimizer, 2, seed=20)
    assert manager.step == 5
