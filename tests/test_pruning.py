"""GradualMagnitudePruning inside training loops: schedule, exact zeros, resume, DDP, errors."""

import copy
import logging

import pytest
import torch
import torch.nn as nn

from compress_callbacks import CompressionManager, GradualMagnitudePruning
from compress_callbacks.callback import CompressionTechnique
from compress_callbacks.pruning.masks import count_to_prune


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


def make_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 4),
    )


def batches(n, seed=123, shape=(8, 16)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), torch.randint(0, 4, (shape[0],), generator=g)) for _ in range(n)]


def train(model, optimizer, data, after_step=None):
    loss_fn = nn.CrossEntropyLoss()
    for i, (x, y) in enumerate(data):
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if after_step:
            after_step(i + 1)


def weights(model):
    return [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ],
    ids=["sgd_momentum", "adamw_wd"],
)
def test_schedule_is_followed_and_zeros_stay_exact(make_opt):
    model = make_model()
    optimizer = make_opt(model.parameters())
    gmp = GradualMagnitudePruning(target_sparsity=0.8, start_step=2, end_step=12, update_every=3)
    manager = CompressionManager(gmp)
    manager.attach(model, optimizer)
    seen_masks = {}

    def check(step):
        assert manager.step == step
        target = gmp.sparsity_at(step)
        for w in weights(model):
            assert int((w == 0).sum()) == count_to_prune(w.numel(), target), (step, target)
            if id(w) in seen_masks:  # pruned stays pruned, exactly zero
                assert (w[seen_masks[id(w)]] == 0).all()
            seen_masks[id(w)] = (w == 0).clone()
            state = optimizer.state[w]
            for value in state.values():
                if torch.is_tensor(value) and value.shape == w.shape:
                    assert (value[w == 0] == 0).all()  # optimizer state does not grow for pruned weights

    train(model, optimizer, batches(20), check)
    assert gmp.overall_sparsity() == pytest.approx(0.8, abs=1e-3)


def test_mask_gradients_step_defers_masking_to_the_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gmp = GradualMagnitudePruning(0.75, start_step=0, end_step=2, update_every=1, mask_gradients="step")
    CompressionManager(gmp).attach(model, optimizer)
    for _ in range(4):
        model(torch.randn(8, 16)).pow(2).mean().backward()
        keep = gmp.masks["0"]
        if not keep.all():  # not masked yet after backward (clipping would count them) ...
            assert float(model[0].weight.grad[~keep].abs().max()) > 0.0
        optimizer.step()
        optimizer.zero_grad()
    for param, keep in zip(gmp.weights.values(), gmp.masks.values()):  # ... but the update still keeps zeros exact
        assert float(param.detach()[~keep].abs().max()) == 0.0
        assert not optimizer.state[param]["momentum_buffer"][~keep].any()
    assert gmp.config()["mask_gradients"] == "step"
    with pytest.raises(ValueError, match="mask_gradients"):
        GradualMagnitudePruning(0.5, start_step=0, end_step=2, mask_gradients="later")


def test_gradients_are_masked_before_clipping_and_replaced_gradients_still_are():
    """Pruned gradients are zero right after backward (so clip_grad_norm_ sees only kept weights),
    across accumulation micro-steps; a gradient replaced after backward is masked before the step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gmp = GradualMagnitudePruning(0.75, start_step=0, end_step=2, update_every=1)
    CompressionManager(gmp).attach(model, optimizer)
    for _ in range(3):  # reach the final masks
        model(torch.randn(8, 16)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for micro in range(2):  # accumulation: two backwards, then one step
        model(torch.randn(8, 16)).pow(2).mean().backward()
        for param, keep in zip(gmp.weights.values(), gmp.masks.values()):
            assert float(param.grad[~keep].abs().max()) == 0.0, micro
    kept_norm = torch.cat([p.grad[k] for p, k in zip(gmp.weights.values(), gmp.masks.values())] +
                          [m.bias.grad for m in model if isinstance(m, nn.Linear)]).norm()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
    torch.testing.assert_close(total, kept_norm)
    model[0].weight.grad = torch.randn_like(model[0].weight)  # replaced after backward: not masked yet
    optimizer.step()
    for param, keep in zip(gmp.weights.values(), gmp.masks.values()):
        assert float(param.detach()[~keep].abs().max()) == 0.0
        assert not optimizer.state[param]["momentum_buffer"][~keep].any()
    optimizer.zero_grad()


def test_a_backward_that_raises_does_not_stop_later_passes_from_masking():
    class FailOnce(torch.autograd.Function):
        armed = False

        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            if FailOnce.armed:
                FailOnce.armed = False
                raise RuntimeError("boom")
            return grad

    torch.manual_seed(0)
    first, second = nn.Linear(16, 32), nn.Linear(32, 4)
    optimizer = torch.optim.SGD([*first.parameters(), *second.parameters()], lr=0.05)
    gmp = GradualMagnitudePruning(0.75, start_step=0, end_step=1, update_every=1)
    model = nn.Sequential(first, second)
    CompressionManager(gmp).attach(model, optimizer)

    def loss():
        return second(FailOnce.apply(torch.relu(first(torch.randn(8, 16))))).pow(2).mean()

    loss().backward()
    optimizer.step()  # final masks from here on
    optimizer.zero_grad()
    FailOnce.armed = True  # second's gradient accumulates (queuing the end-of-pass masking), then backward raises
    with pytest.raises(RuntimeError, match="boom"):
        loss().backward()
    optimizer.zero_grad()
    loss().backward()
    for param, keep in zip(gmp.weights.values(), gmp.masks.values()):
        assert float(param.grad[~keep].abs().max()) == 0.0


def test_nothing_is_pruned_before_start_and_model_is_unchanged():
    model = make_model()
    reference = copy.deepcopy(model)
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(reference.parameters(), lr=0.1)
    CompressionManager(GradualMagnitudePruning(0.5, start_step=10, end_step=20)).attach(model, opt_a)
    data = batches(9)
    train(model, opt_a, data)
    train(reference, opt_b, data)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("granularity", ["channel", "2:4"])
def test_structured_granularities_reach_their_pattern(granularity):
    model = make_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    target = 0.5
    manager = CompressionManager(
        GradualMagnitudePruning(target, start_step=0, end_step=6, update_every=2, granularity=granularity,
                                exclude=["0"])  # first conv has 27 inputs per output (not a multiple of 4)
    )
    manager.attach(model, optimizer)
    train(model, optimizer, batches(8, shape=(4, 3, 8, 8)))
    for name, module in model.named_modules():
        if name in ("3", "6"):
            w = module.weight.detach()
            if granularity == "channel":
                rows = (w.reshape(w.shape[0], -1) != 0).any(1)
                assert int((~rows).sum()) == count_to_prune(w.shape[0], target)
            else:
                groups = (w.reshape(-1, 4) != 0).sum(1)
                assert (groups <= 2).all()
                assert int((w == 0).sum()) == w.numel() // 2


def test_global_scope_hits_overall_target():
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gmp = GradualMagnitudePruning(0.9, start_step=0, end_step=5, update_every=1, scope="global")
    manager = CompressionManager(gmp)
    manager.attach(model, optimizer)
    with pytest.warns(UserWarning, match="'2' is pruned down to its last weight"):  # kept, not emptied
        train(model, optimizer, batches(6))
    assert all(bool((w != 0).any()) for w in weights(model))
    total = sum(w.numel() for w in weights(model))
    zeros = sum(int((w == 0).sum()) for w in weights(model))
    assert zeros == count_to_prune(total, 0.9)
    per_layer = list(gmp.layer_sparsities().values())
    assert max(per_layer) - min(per_layer) > 0.01  # global differs per layer


def test_sparse_checkpoint_zeros_stay_zero_and_zero_init_layers_still_train():
    model = make_model()
    with torch.no_grad():
        model[0].weight[:, :4] = 0.0  # a sparse checkpoint
        model[4].weight.zero_()  # a zero-initialised head must be free to train
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    CompressionManager(GradualMagnitudePruning(0.5, start_step=50, end_step=60)).attach(model, optimizer)
    train(model, optimizer, batches(5))
    assert (model[0].weight[:, :4] == 0).all()
    assert (model[4].weight != 0).any()


def test_modules_and_exclude_select_by_name_regex_and_type():
    model = make_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gmp = GradualMagnitudePruning(0.5, start_step=0, end_step=1, modules=["re:[03]", nn.Linear], exclude=["3"])
    CompressionManager(gmp).attach(model, optimizer)
    assert list(gmp.layer_sparsities()) == ["0", "6"]
    assert model[1].weight.ne(0).all() and model[3].weight.ne(0).all()


def test_accelerate_accumulation_counts_real_updates_only():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    gmp = GradualMagnitudePruning(0.5, start_step=1, end_step=3, update_every=1)
    manager = CompressionManager(gmp, accelerator=accelerator)
    manager.attach(model, optimizer)
    loss_fn = nn.CrossEntropyLoss()
    steps_seen = []
    for x, y in batches(12):
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
        steps_seen.append(manager.step)
    assert steps_seen == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert gmp.overall_sparsity() == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_grad_scaler_skipped_update_does_not_count(fused):
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    gmp = GradualMagnitudePruning(0.5, start_step=1, end_step=2, update_every=1)
    manager = CompressionManager(gmp)
    manager.attach(model, optimizer)
    loss_fn = nn.CrossEntropyLoss()
    for i, (x, y) in enumerate(batches(4)):
        loss = loss_fn(model(x), y)
        if i == 1:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert manager.step == 3
    assert gmp.overall_sparsity() == pytest.approx(0.5, abs=1e-3)


def test_manual_drive_and_unknown_optimizer_keep_exact_zeros():
    class PlainSGD(torch.optim.Optimizer):  # not in the zero-preserving list: weights re-zeroed after updates
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad + 0.01, alpha=-group["lr"])  # moves even zero-gradient weights

    model = make_model()
    optimizer = PlainSGD(model.parameters(), lr=0.1)
    manager = CompressionManager(GradualMagnitudePruning(0.6, start_step=0, end_step=2, update_every=1))
    manager.attach(model, optimizer, hook=False)
    with pytest.raises(ValueError, match="attach"):
        CompressionManager().record_update()
    train(model, optimizer, batches(5), lambda _: manager.record_update())
    assert manager.step == 5
    for w in weights(model):
        assert int((w == 0).sum()) == count_to_prune(w.numel(), 0.6)


def run_with_checkpoint(tmp_path, interrupt_at):
    """Train 16 updates; optionally save at `interrupt_at`, rebuild everything and resume."""
    from accelerate import Accelerator

    data = batches(16)

    def build():
        accelerator = Accelerator(cpu=True)
        model = make_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
        model, optimizer = accelerator.prepare(model, optimizer)
        gmp = GradualMagnitudePruning(0.75, start_step=2, end_step=14, update_every=3)
        manager = CompressionManager(gmp, accelerator=accelerator)
        manager.attach(model, optimizer)
        return accelerator, model, optimizer, manager

    accelerator, model, optimizer, manager = build()
    loss_fn = nn.CrossEntropyLoss()

    def steps(model, optimizer, chunk):
        for x, y in chunk:
            accelerator.backward(loss_fn(model(x), y))
            optimizer.step()
            optimizer.zero_grad()

    if interrupt_at is None:
        steps(model, optimizer, data)
    else:
        steps(model, optimizer, data[:interrupt_at])
        accelerator.save_state(str(tmp_path / "ckpt"))
        accelerator, model, optimizer, manager = build()
        accelerator.load_state(str(tmp_path / "ckpt"))
        assert manager.step == interrupt_at
        steps(model, optimizer, data[interrupt_at:])
    return manager.finalize(model)


def test_resume_matches_uninterrupted_run(tmp_path):
    straight = run_with_checkpoint(tmp_path, None)
    resumed = run_with_checkpoint(tmp_path, 7)  # mid-schedule, between grid points
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
        assert torch.equal(a == 0, b == 0), name


def test_state_dict_loads_before_attach():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = CompressionManager(GradualMagnitudePruning(0.5, start_step=0, end_step=2, update_every=1))
    manager.attach(model, optimizer)
    train(model, optimizer, batches(3))
    state = manager.state_dict()
    assert all(m.dtype == torch.bool for m in state["callbacks"]["0:GradualMagnitudePruning"]["masks"])

    fresh = make_model(seed=1)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    other = CompressionManager(GradualMagnitudePruning(0.5, start_step=0, end_step=2, update_every=1))
    other.load_state_dict(state)
    other.attach(fresh, fresh_opt)
    assert other.step == 3
    for a, b in zip(weights(model), weights(fresh)):
        assert torch.equal(a == 0, b == 0)


def test_finalize_returns_plain_module_that_loads_strictly():
    model = make_cnn()
    wrapped = nn.DataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = CompressionManager(GradualMagnitudePruning(0.7, start_step=0, end_step=2, update_every=1))
    manager.attach(wrapped, optimizer)
    train(wrapped, optimizer, batches(3, shape=(4, 3, 8, 8)))
    compressed = manager.finalize(wrapped)
    assert compressed is model
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    fresh = make_cnn(seed=5)
    fresh.load_state_dict(compressed.state_dict(), strict=True)
    x = torch.randn(2, 3, 8, 8)
    compressed.eval(), fresh.eval()
    assert torch.equal(compressed(x), fresh(x))
    before = [w.clone() for w in weights(compressed)]
    train(compressed, optimizer, batches(1, shape=(4, 3, 8, 8)))  # no hooks left: zeros may move now
    assert manager.step == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, weights(compressed)))


def test_summary_and_logging(caplog):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = CompressionManager(GradualMagnitudePruning(0.5, start_step=0, end_step=2, update_every=1), log_every=1)
    with caplog.at_level(logging.INFO, logger="compress_callbacks"):
        manager.attach(model, optimizer)
        train(model, optimizer, batches(2))
    assert "mask_sparsity=0.5" in caplog.text
    table = manager.summary()
    for name in ("0", "2", "4"):
        assert f"\n  {name} " in table
    assert "0.5000" in table and "16x64" not in table and "64x16" in table


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_sparsity=1.0, start_step=0, end_step=10), "target_sparsity"),
        (dict(target_sparsity=-0.1, start_step=0, end_step=10), "target_sparsity"),
        (dict(target_sparsity=0.5, start_step=10, end_step=10), "end_step"),
        (dict(target_sparsity=0.5, start_step=-1, end_step=10), "start_step"),
        (dict(target_sparsity=0.5, start_step=0, end_step=10, update_every=0), "update_every"),
        (dict(target_sparsity=0.5, start_step=0, end_step=10, granularity="rows"), "granularity"),
        (dict(target_sparsity=0.3, start_step=0, end_step=10, granularity="2:4"), "target_sparsity"),
        (dict(target_sparsity=0.5, start_step=0, end_step=10, scope="model"), "scope"),
        (dict(target_sparsity=0.5, start_step=0, end_step=10, initial_sparsity=0.6), "initial_sparsity"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradualMagnitudePruning(**kwargs)


def test_attach_errors_touch_nothing():
    model = make_cnn()
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="modules"):
        CompressionManager(GradualMagnitudePruning(0.5, 0, 10, modules=["does.not.exist"])).attach(model, optimizer)
    with pytest.raises(ValueError, match="granularity"):  # first conv: 27 inputs per output
        CompressionManager(GradualMagnitudePruning(None, 0, 10, granularity="2:4")).attach(model, optimizer)
    head_only = torch.optim.SGD(model[6].parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer"):
        CompressionManager(GradualMagnitudePruning(0.5, 0, 10)).attach(model, head_only)
    with pytest.raises(TypeError, match="modules"):
        GradualMagnitudePruning(0.5, 0, 10, modules=[3])
    good = GradualMagnitudePruning(0.5, 0, 10, initial_sparsity=0.2)
    manager = CompressionManager(good)
    bad_second = GradualMagnitudePruning(0.5, 0, 10, modules=["nope"])
    with pytest.raises(ValueError, match="modules"):
        CompressionManager(GradualMagnitudePruning(0.5, 0, 10, initial_sparsity=0.2), bad_second).attach(model, optimizer)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # nothing half-applied
    assert not optimizer._optimizer_step_pre_hooks
    manager.attach(model, optimizer)
    with pytest.raises(ValueError, match="attach"):
        manager.attach(model, optimizer)
    with pytest.raises(TypeError, match="callbacks"):
        CompressionManager("gmp")


def _ddp_worker(path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():  # many exact ties: selection must still agree across ranks
        model[0].weight.copy_(torch.randint(-3, 4, model[0].weight.shape).float() / 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0 keeps the ties through training
    model, optimizer = accelerator.prepare(model, optimizer)
    gmp = GradualMagnitudePruning(0.6, start_step=0, end_step=4, update_every=2)
    manager = CompressionManager(gmp, accelerator=accelerator)
    manager.attach(model, optimizer)
    g = torch.Generator().manual_seed(accelerator.process_index)
    for _ in range(4):
        x = torch.randn(8, 16, generator=g)
        accelerator.backward(model(x).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
    masks = torch.cat([k.flatten().float() for k in gmp.masks.values()])
    gathered = accelerator.gather(masks.unsqueeze(0))
    assert torch.equal(gathered[0], gathered[1]), "ranks disagree on masks"
    # gradients are masked at the end of backward, after DDP's reducer has written the all-reduced
    # gradients (masking earlier would be overwritten): before the step, where clipping would run,
    # pruned gradients are exactly zero on both ranks
    accelerator.backward(model(torch.randn(8, 16, generator=g)).pow(2).mean())
    for param, keep in zip(gmp.weights.values(), gmp.masks.values()):
        assert not keep.all() and float(param.grad[~keep].abs().max()) == 0.0
        assert float(param.grad[keep].abs().max()) > 0.0
    grads = torch.cat([p.grad.flatten() for p in gmp.weights.values()])
    both = accelerator.gather(grads.unsqueeze(0))
    assert torch.equal(both[0], both[1]), "the all-reduced gradients differ between ranks"
    optimizer.zero_grad()
    assert manager.step == 4
    assert abs(gmp.overall_sparsity() - 0.6) < 1e-3
    with open(f"{path}/rank{accelerator.process_index}.txt", "w") as f:
        f.write(str(int(masks.sum())))


def test_sharded_models_are_refused_before_anything_is_touched():
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from compress_callbacks import QuantizationAwareTraining

    # DeepSpeed ZeRO-3 marks its partitioned parameters with ds_id
    model = make_cnn()
    model[0].weight.ds_id = 0
    with pytest.raises(NotImplementedError, match="DeepSpeed ZeRO-3.*0.weight"):
        CompressionManager(GradualMagnitudePruning(0.5, 0, 10)).attach(model, torch.optim.SGD(model.parameters(), lr=0.1))

    # DTensor weights outside FSDP2's layout (here replicated, as tensor parallelism leaves some):
    # refused before anything is touched (without the check GMP failed deep in a DTensor op)
    from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        mesh = init_device_mesh("cpu", (1,))
        model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Replicate()]))
        before = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for callbacks in ([QuantizationAwareTraining(start_step=0)],
                          [GradualMagnitudePruning(0.5, 0, 2, update_every=1), QuantizationAwareTraining(start_step=0)]):
            manager = CompressionManager(*callbacks)
            with pytest.raises(NotImplementedError, match="only in FSDP2's layout.*tensor parallel.*0.weight.*DDP"):
                manager.attach(model, optimizer)
            assert not manager.attached
        after = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
        assert all(torch.equal(after[k], v) for k, v in before.items())
        assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
        # FSDP2's own layout is accepted by the package's callbacks; a callback that does not declare
        # `supports_sharded_weights` (a user's own) is refused by name
        fsdp_model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        fully_shard(fsdp_model[0])
        fully_shard(fsdp_model)

        class CountUpdates(CompressionTechnique):
            pass

        partly = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        fully_shard(partly[0])  # the last layer's weight stays a plain tensor
        with pytest.raises(NotImplementedError, match="every targeted weight sharded over one mesh"):
            CompressionManager(GradualMagnitudePruning(0.5, 0, 2)).attach(partly, torch.optim.SGD(partly.parameters(), lr=0.1))
        assert not any(hasattr(p, "_post_accumulate_grad_hooks") and p._post_accumulate_grad_hooks for p in partly.parameters())
        # FSDP2 splits dim 0; a ConvTranspose / Conv1D holds its output channels along dim 1
        transposed = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.ConvTranspose1d(8, 4, 1))
        fully_shard(transposed)
        n_m = GradualMagnitudePruning(0.5, 0, 2, granularity="2:4", modules=[nn.Linear, nn.ConvTranspose1d])
        with pytest.raises(NotImplementedError, match=r"granularity '2:4': \['2'\] store their output channels along dim 1"):
            CompressionManager(n_m).attach(transposed, torch.optim.SGD(transposed.parameters(), lr=0.1))
        hooks = len(transposed._forward_pre_hooks)  # FSDP2's
        for granularity in ("channel", "head"):  # grouped selection runs on dim-0 blocks: dim-1 layers stay refused
            grouped = GradualMagnitudePruning(0.5, 0, 2, granularity=granularity, modules=[nn.Linear, nn.ConvTranspose1d])
            with pytest.raises(NotImplementedError, match=fr"granularity '{granularity}': \['2'\] store their output channels along dim 1"):
                CompressionManager(grouped).attach(transposed, torch.optim.SGD(transposed.parameters(), lr=0.1))
            assert len(transposed._forward_pre_hooks) == hooks  # no input hook left behind
        with pytest.raises(NotImplementedError, match="CountUpdates needs every rank to hold whole weights.*FSDP2"):
            CompressionManager(GradualMagnitudePruning(0.5, 0, 2), CountUpdates()).attach(
                fsdp_model, torch.optim.SGD(fsdp_model.parameters(), lr=0.1))
        manager = CompressionManager(GradualMagnitudePruning(0.5, 0, 2, update_every=1), QuantizationAwareTraining(start_step=0))
        manager.attach(fsdp_model, torch.optim.SGD(fsdp_model.parameters(), lr=0.1))
        assert manager.attached
    finally:
        dist.destroy_process_group()


def _fsdp2_worker(path):
    """Two ranks, FSDP2 (``fully_shard``) with gloo: every selection must give the masks a single
    process gives on the same weights (ties included), on uneven blocks of rows too."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from compress_callbacks import _dist as D

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    for scope, granularity, target in (("layer", "unstructured", 0.6), ("global", "unstructured", 0.6),
                                       ("global", "2:4", 0.5)):
        torch.manual_seed(0)
        reference = nn.Sequential(nn.Linear(16, 30), nn.ReLU(), nn.Linear(30, 5), nn.ReLU(), nn.Linear(5, 4))
        with torch.no_grad():  # exact ties across the two ranks' blocks
            reference[0].weight.copy_(torch.randint(-3, 4, reference[0].weight.shape).float() / 4)
        model = copy.deepcopy(reference)
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        assert all(D.is_sharded(p) for p in model.parameters())
        kwargs = dict(start_step=0, end_step=4, update_every=2, scope=scope, granularity=granularity,
                      exclude=["2", "4"] if granularity == "2:4" else None,  # 2:4 needs fan-in % 4 == 0
                      initial_sparsity=0.3)  # the first selection runs at attach, on the tie-heavy weights
        sharded_gmp, reference_gmp = GradualMagnitudePruning(target, **kwargs), GradualMagnitudePruning(target, **kwargs)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01)
        manager = CompressionManager(sharded_gmp)
        manager.attach(model, optimizer)
        CompressionManager(reference_gmp).attach(reference, reference_optimizer)
        g = torch.Generator().manual_seed(1)  # the same batches on both ranks: the averaged gradient is the reference's
        for _ in range(6):
            x = torch.randn(8, 16, generator=g)
            for net, opt in ((model, optimizer), (reference, reference_optimizer)):
                net(x).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        state, expected = sharded_gmp.state_dict(), reference_gmp.state_dict()
        for mask, want, param, ref_param in zip(state["masks"], expected["masks"], sharded_gmp.weights.values(), reference_gmp.weights.values()):
            whole = param.detach().full_tensor()
            assert torch.equal(mask, want), f"{scope}/{granularity}: masks differ from a single process"
            assert torch.all(whole[~mask] == 0) and torch.allclose(whole, ref_param.detach(), atol=1e-6)
        assert sharded_gmp.layer_sparsities() == reference_gmp.layer_sparsities()
        assert sharded_gmp.log_values() == reference_gmp.log_values()
        if dist.get_rank() == 0:  # reporting from one rank must not wait for the others
            assert "sparsity" in manager.summary() and sharded_gmp.overall_sparsity() == reference_gmp.overall_sparsity()
        dist.barrier()
        # gradients of pruned weights are zero on each rank's block when backward returns
        model(torch.randn(8, 16, generator=g)).pow(2).mean().backward()
        for param, keep in zip(sharded_gmp.weights.values(), sharded_gmp.masks.values()):
            assert keep.shape == D.local(param).shape
            assert float(D.local(param.grad)[~keep].abs().sum()) == 0.0
        optimizer.zero_grad()
        # resume: whole masks in the state, each rank takes its block back
        fresh = GradualMagnitudePruning(target, **kwargs)
        fresh.load_state_dict(state)
        resumed = CompressionManager(fresh)
        resumed.attach(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
        assert all(torch.equal(a, b) for a, b in zip(fresh.masks.values(), sharded_gmp.masks.values()))
        assert "sparsity" in resumed.summary()  # reporting reduces counts over the ranks' blocks
        finalized = resumed.finalize(model)
        for mask, name in zip(state["masks"], state["names"]):
            param = finalized.get_submodule(name).weight
            assert torch.all(param.detach().full_tensor()[~mask] == 0), name
    # channel and head under FSDP2: tests/test_structured_fsdp2.py
    # gradient accumulation: FSDP2 reduces only on the last micro-batch; one real update each
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(16, 30), nn.ReLU(), nn.Linear(30, 5))
    model = copy.deepcopy(reference)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    runs = []
    for net in (model, reference):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        gmp = GradualMagnitudePruning(0.6, start_step=0, end_step=4, update_every=2, initial_sparsity=0.3)
        manager = CompressionManager(gmp)
        manager.attach(net, optimizer)
        runs.append((gmp, optimizer, manager))
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        micro_batches = [torch.randn(8, 16, generator=g) for _ in range(3)]
        for i, x in enumerate(micro_batches):
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            model(x).pow(2).mean().backward()
            reference(x).pow(2).mean().backward()
        for _, optimizer, _ in runs:
            optimizer.step()
            optimizer.zero_grad()
    assert runs[0][2].step == runs[1][2].step == 5
    for param, ref_param in zip(runs[0][0].weights.values(), runs[1][0].weights.values()):
        assert torch.allclose(param.detach().full_tensor(), ref_param.detach(), atol=1e-6)
    assert runs[0][0].layer_sparsities() == runs[1][0].layer_sparsities() == {"0": 0.6, "2": 0.6}
    with open(f"{path}/rank{dist.get_rank()}.txt", "w") as f:
        f.write("ok")


def test_fsdp2_sharded_masks_match_a_single_process(tmp_path, launch_two_processes):
    launch_two_processes(_fsdp2_worker, tmp_path)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["ok", "ok"]


def test_ddp_ranks_hold_identical_masks(tmp_path, launch_two_processes):
    launch_two_processes(_ddp_worker, tmp_path)
    counts = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert counts[0] == counts[1]
