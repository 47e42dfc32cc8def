"""Compression under ``torch.compile``: fake-quant, masking and the BatchNorm pairing trace into one
graph (forward and backward), and what runs only at real updates stays out of graphs.

Dynamo alone (``torch._dynamo.explain``) and AOT autograd without code generation (``aot_eager`` and
a counting backend) keep these checks to seconds; Inductor itself is exercised by
``benchmarks/compile.py``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters

from compress_callbacks import CompressionManager, DistillationLoss, GradualMagnitudePruning, QuantizationAwareTraining


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


MODELS = {"mlp": (mlp, (6, 12)), "cnn": (cnn, (4, 3, 8, 8))}
TECHNIQUES = ["gmp", "qat", "gmp+qat"]


def batch(shape, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randint(0, 3, (shape[0],), generator=g)


def compressed(make, techniques: str, **qat):
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    callbacks = []
    if "gmp" in techniques:
        callbacks.append(GradualMagnitudePruning(target_sparsity=0.5, start_step=0, end_step=4, update_every=2))
    if "qat" in techniques:
        callbacks.append(QuantizationAwareTraining(start_step=0, **qat))
    manager = CompressionManager(*callbacks)
    manager.attach(model, optimizer)
    return model, optimizer, manager


def train_step(model, optimizer, x, y):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graph_breaks(fn, *args):
    explanation = torch._dynamo.explain(fn)(*args)
    return explanation.graph_break_count, [str(b.reason).splitlines()[0] for b in explanation.break_reasons]


@pytest.mark.parametrize("techniques", TECHNIQUES)
@pytest.mark.parametrize("name", MODELS)
def test_forward_traces_without_graph_breaks_from_the_first_step_on(name, techniques):
    """The first forward (ranges not started, the BatchNorm pairing not yet checked) and a forward
    after updates (ranges started, pairing settled, masks applied) are one graph each."""
    make, shape = MODELS[name]
    model, optimizer, _ = compressed(make, techniques)
    x, y = batch(shape, 0)
    assert graph_breaks(lambda x: F.cross_entropy(model(x), y), x) == (0, [])
    for seed in range(3):
        train_step(model, optimizer, *batch(shape, seed))
    torch._dynamo.reset()
    assert graph_breaks(lambda x: F.cross_entropy(model(x), y), x) == (0, [])


class GraphCounter:
    """An AOT-autograd backend that counts the forward and backward graphs it is given (run eagerly)."""

    def __init__(self) -> None:
        self.forward = self.backward = 0

        def forward(graph, example_inputs):
            self.forward += 1
            return make_boxed_func(graph)

        def backward(graph, example_inputs):
            self.backward += 1
            return make_boxed_func(graph)

        self.backend = aot_autograd(fw_compiler=forward, bw_compiler=backward)


@pytest.mark.parametrize("techniques", ["plain", "gmp+qat"])
def test_compiled_model_trains_like_eager_with_one_forward_and_one_backward_graph(techniques):
    """``torch.compile(model)`` with GMP + QAT on a CNN with BatchNorm: the same weights, masks and
    ranges as eager; one forward and one backward graph per compilation, and only the switches at
    the first updates (ranges started, pairing settled, masks raised) recompile."""
    make, shape = MODELS["cnn"]
    eager, eager_opt, eager_manager = compressed(make, techniques)
    model, optimizer, manager = compressed(make, techniques)
    counter = GraphCounter()
    compiled = torch.compile(model, backend=counter.backend)
    for seed in range(6):
        x, y = batch(shape, seed)
        torch.testing.assert_close(train_step(compiled, optimizer, x, y), train_step(eager, eager_opt, x, y))
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert counter.forward == counter.backward  # every forward graph got its backward graph: nothing left eager
    assert 1 <= counter.forward <= 2
    if techniques == "plain":
        return
    gmp, qat = manager.callbacks
    eager_gmp, eager_qat = eager_manager.callbacks
    assert all(torch.equal(gmp.masks[n], eager_gmp.masks[n]) for n in gmp.masks)
    assert gmp.overall_sparsity() == pytest.approx(0.5, abs=0.01)
    assert sorted(qat.ranges) == sorted(eager_qat.ranges) == ["0", "3", "8"]
    for name, (lo, hi) in qat.ranges.items():
        torch.testing.assert_close((lo, hi), eager_qat.ranges[name])
    assert [row["folded_bn"] for row in qat.summary_rows()] == ["1", "4", "-"]
    assert not model[1]._forward_pre_hooks and not model[4]._forward_pre_hooks  # the pairing check was settled


def test_compiled_forwards_start_ranges_without_a_host_sync():
    """Before the first update, a compiled forward starts each layer's input range on the observer's
    tensors; the update marks the layers initialized (outside the graph), as eager forwards do at once."""
    make, shape = MODELS["mlp"]
    model, optimizer, manager = compressed(make, "qat")
    qat = manager.callbacks[0]
    compiled = torch.compile(model, backend="aot_eager")
    x, y = batch(shape, 0)
    out = compiled(x)
    assert [st.initialized for st in qat._layers] == [False] * 3  # nothing read back from the graph yet
    group = qat._groups[0]
    assert group.started.tolist() == [True] * 3 and group.settled.tolist() == [False] * 3
    lo, hi = float(x.min()), float(x.max())
    assert (float(group.running_min[0]), float(group.running_max[0])) == (lo, hi)  # the first input, as it is
    with torch.no_grad():
        reference = copy.deepcopy(model)(x)  # eager forward of a copy: fake-quantized with the same range
    torch.testing.assert_close(out, reference)
    F.cross_entropy(out, y).backward()
    optimizer.step()
    assert [st.initialized for st in qat._layers] == [True] * 3
    assert sorted(qat.ranges) == ["0", "2", "4"] and float(qat.ranges["0"][0]) == lo


def test_compiled_forward_without_a_finite_input_leaves_the_range_unstarted():
    make, shape = MODELS["mlp"]
    model, optimizer, manager = compressed(make, "qat")
    qat = manager.callbacks[0]
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.full(shape, float("nan"))
    compiled(x).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    assert not qat._layers[0].initialized and "0" not in qat.ranges
    x, y = batch(shape, 0)
    train_step(compiled, optimizer, x, y)
    assert qat._layers[0].initialized and float(qat.ranges["0"][1]) == float(x.max())


def test_compiled_forward_unpairs_a_batchnorm_that_does_not_consume_the_conv_at_the_update():
    class ConvReluBn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(torch.relu(self.conv(x)))

    model = ConvReluBn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    qat = QuantizationAwareTraining()
    CompressionManager(qat).attach(model, optimizer)
    compiled = torch.compile(model, backend="aot_eager")
    assert graph_breaks(compiled, torch.randn(2, 3, 6, 6)) == (0, [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(torch.randn(2, 3, 6, 6)).sum().backward()  # the graph cannot warn nor remove the hook
    assert not [w for w in caught if "does not consume" in str(w.message)]
    assert qat.summary_rows()[0]["folded_bn"] == "bn"
    with pytest.warns(UserWarning, match="does not consume"):
        optimizer.step()
    assert qat.summary_rows()[0]["folded_bn"] == "-" and not model.bn._forward_pre_hooks


def test_compiling_the_whole_step_does_not_recompile_at_each_update():
    """``torch.compile`` over forward, backward and ``optimizer.step()``: mask updates and observer folds
    run between graphs (``torch.compiler.disable`` at their entry points), so steps after the
    schedule's switches reuse the graphs compiled before."""
    make, shape = MODELS["mlp"]
    model, optimizer, manager = compressed(make, "gmp+qat")
    gmp = manager.callbacks[0]
    step = torch.compile(train_step, backend="aot_eager")
    data = [batch(shape, seed) for seed in range(12)]
    for x, y in data[:6]:
        step(model, optimizer, x, y)
    compiled_frames = counters["stats"]["unique_graphs"]
    # the step's own pieces (forward, backward, optimizer) and a recompile at the first update; tracing
    # into the mask updates and the native kernels made 42 graphs here
    assert compiled_frames <= 6
    for x, y in data[6:]:
        step(model, optimizer, x, y)
    assert counters["stats"]["unique_graphs"] == compiled_frames
    assert manager.step == 12 and gmp.overall_sparsity() == pytest.approx(0.5, abs=0.01)
    for name, weight in gmp.weights.items():
        assert not weight[~gmp.masks[name]].any()


def test_compiled_student_and_teacher_with_distillation_match_eager():
    """KD: a compiled student (compressed) and a compiled teacher are one graph each; the loss runs
    eagerly between them (its fused gradient is not traced), compiled step or not."""
    make, shape = MODELS["mlp"]
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 3))
    x, y = batch(shape, 0)
    losses = []
    for compile_ in (False, True):
        model, optimizer, _ = compressed(make, "gmp+qat")
        student = torch.compile(model, backend="aot_eager") if compile_ else model
        distill = DistillationLoss(torch.compile(teacher, backend="aot_eager") if compile_ else teacher, temperature=2.0, alpha=0.5)
        step_losses = []
        for seed in range(3):
            x, y = batch(shape, seed)
            loss = distill(student(x), y, inputs=x)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step_losses.append(loss.detach())
        losses.append(torch.stack(step_losses))
        if compile_:
            assert graph_breaks(lambda x: student(x), x) == (0, [])
            assert graph_breaks(lambda x: teacher(x), x) == (0, [])
    torch.testing.assert_close(losses[1], losses[0])
    torch._dynamo.reset()
    whole = torch.compile(lambda s, x, y: distill(s(x), y, inputs=x), backend="aot_eager")
    torch.testing.assert_close(whole(model, x, y), distill(model(x), y, inputs=x))
