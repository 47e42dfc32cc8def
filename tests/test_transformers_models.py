"""Pruning and QAT on a tiny, randomly initialised GPT-2: Transformers ``Conv1D`` projections (weight
``[in, out]``) are targeted by default along the right dims, and the LM head tied to the token
embedding is left alone unless named."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")  # a test dependency (pyproject [test]); always installed there

from transformers.pytorch_utils import Conv1D  # noqa: E402

from compress_callbacks import CompressionManager, GradualMagnitudePruning, QuantizationAwareTraining  # noqa: E402
from compress_callbacks.pruning.masks import count_to_prune  # noqa: E402
from compress_callbacks.quantization.spec import get_qparams  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on shared cores

VOCAB, WIDTH = 64, 32


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=WIDTH, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def token_batches(n, seed=1, shape=(4, 12)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, shape, generator=g) for _ in range(n)]


def train(model, optimizer, steps, seed=1):
    for ids in token_batches(steps, seed):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def conv1d_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, Conv1D)]


# ----------------------------------------------------------------------------------- tied weights
@pytest.mark.parametrize("technique", ["gmp", "qat"])
def test_default_selection_skips_the_lm_head_tied_to_the_embedding_and_says_so(technique):
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    embedding = model.transformer.wte.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    callback = (GradualMagnitudePruning(0.5, start_step=0, end_step=2, update_every=1) if technique == "gmp"
                else QuantizationAwareTraining(start_step=0, weight_bits=4))
    manager = CompressionManager(callback)
    with pytest.warns(UserWarning, match=r"skipping 'lm_head' \(its weight is also the weight of 'transformer.wte'\)") as caught:
        manager.attach(model, optimizer)
    assert len([w for w in caught if "lm_head" in str(w.message)]) == 1  # once per attach
    train(model, optimizer, 3)
    targeted = list(callback.weights) if technique == "gmp" else [row["module"] for row in callback.summary_rows()]
    assert "lm_head" not in targeted and sorted(targeted) == sorted(conv1d_names(model))
    compressed = manager.finalize(model)
    # AdamW moved the embedding, but neither pruning nor the 4-bit grid touched it
    moved = compressed.transformer.wte.weight.detach()
    assert int((moved == 0).sum()) == int((embedding == 0).sum())
    if technique == "qat":
        assert "lm_head" not in get_qparams(compressed)
        step = moved.abs().amax(1, keepdim=True) / 7
        assert not torch.allclose(moved, (moved / step).round() * step)  # not on a 4-bit grid


@pytest.mark.parametrize("technique", ["gmp", "qat"])
def test_naming_the_tied_lm_head_targets_it_and_the_embedding_with_it(technique):
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    callback = (GradualMagnitudePruning(0.5, start_step=0, end_step=2, update_every=1, modules=["lm_head"])
                if technique == "gmp" else QuantizationAwareTraining(start_step=0, weight_bits=4, modules=["lm_head"]))
    manager = CompressionManager(callback)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named: no warning
        manager.attach(model, optimizer)
    train(model, optimizer, 3)
    compressed = manager.finalize(model)
    shared = compressed.transformer.wte.weight.detach()
    if technique == "gmp":
        assert int((shared == 0).sum()) == count_to_prune(shared.numel(), 0.5)
    else:
        spec = get_qparams(compressed)["lm_head"]
        codes = shared / spec.weight_scale[:, None]
        assert torch.allclose(codes, codes.round(), atol=1e-4) and int(codes.round().abs().amax()) == 7


# ----------------------------------------------------------------------------------- Conv1D pruning
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_conv1d_projections_are_pruned_by_default_unstructured(scope):
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gmp = GradualMagnitudePruning(0.75, start_step=0, end_step=2, update_every=1, scope=scope)
    with pytest.warns(UserWarning, match="lm_head"):
        CompressionManager(gmp).attach(model, optimizer)
    train(model, optimizer, 3)
    assert sorted(gmp.weights) == sorted(conv1d_names(model)) and len(gmp.weights) == 8
    weights = [model.get_submodule(name).weight for name in conv1d_names(model)]
    if scope == "layer":
        for w in weights:
            assert int((w == 0).sum()) == count_to_prune(w.numel(), 0.75)
    else:
        assert sum(int((w == 0).sum()) for w in weights) == count_to_prune(sum(w.numel() for w in weights), 0.75)


def test_conv1d_channel_pruning_removes_output_columns():
    model = tiny_gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    gmp = GradualMagnitudePruning(0.5, start_step=0, end_step=2, update_every=1, granularity="channel",
                                  modules=["re:.*mlp.c_fc"])
    CompressionManager(gmp).attach(model, optimizer)
    train(model, optimizer, 3)
    layer = model.transformer.h[0].mlp.c_fc  # weight [in=32, out=128]
    weight = layer.weight.detach()
    dead = (weight == 0).all(dim=0)
    assert int(dead.sum()) == 64 and not bool((weight == 0).all(dim=1).any())
    seen = {}
    layer.register_forward_hook(lambda module, args, out: seen.setdefault("out", out.detach()))
    model(input_ids=token_batches(1, seed=7)[0])
    out = seen["out"]  # a pruned output channel is its bias, whatever the input
    assert torch.allclose(out[..., dead], layer.bias.detach()[dead].expand_as(out[..., dead]))


def test_conv1d_n_m_groups_run_along_the_input_dim():
    model = tiny_gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    gmp = GradualMagnitudePruning(None, start_step=0, end_step=4, update_every=2, granularity="2:4")
    with pytest.warns(UserWarning, match="lm_head"):
        CompressionManager(gmp).attach(model, optimizer)
    train(model, optimizer, 5)
    for name in conv1d_names(model):
        weight = model.get_submodule(name).weight.detach()  # [in, out]: groups of 4 consecutive inputs per output
        groups = (weight.t() != 0).reshape(-1, 4).sum(1)
        assert (groups == 2).all(), name


# ----------------------------------------------------------------------------------- Conv1D QAT
def test_conv1d_qat_scales_each_output_column_and_finalize_snaps_to_it():
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    qat = QuantizationAwareTraining(start_step=0, weight_bits=4)
    with pytest.warns(UserWarning, match="lm_head"):
        manager = CompressionManager(qat)
        manager.attach(model, optimizer)
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 5, WIDTH)
    with torch.no_grad():  # what the fake-quant forward computes: a per-column 4-bit grid, inputs on 8 bits
        weight = layer.weight.detach()
        column_scale = weight.abs().amax(0) / 7
        expected = torch.addmm(layer.bias, qat_input(qat, "transformer.h.0.attn.c_attn", x).reshape(-1, WIDTH),
                               (weight / column_scale).round() * column_scale)
        assert torch.allclose(layer(x).reshape(-1, weight.shape[1]), expected, atol=1e-5)
    train(model, optimizer, 3)
    compressed = manager.finalize(model)
    specs = get_qparams(compressed)
    assert sorted(specs) == sorted(conv1d_names(compressed))
    for name in conv1d_names(compressed):
        weight, spec = compressed.get_submodule(name).weight.detach(), specs[name]
        assert spec.weight_axis == 1 and spec.weight_scale.shape == (weight.shape[1],)
        codes = weight / spec.weight_scale[None, :]
        assert torch.allclose(codes, codes.round(), atol=1e-4) and int(codes.round().abs().amax()) == 7


def qat_input(qat, name, x):
    """The layer's input as its fake-quant forward sees it (its observed 8-bit range)."""
    from compress_callbacks.quantization import fake_quant as FQ

    lo, hi = (torch.aminmax(x) if name not in qat.ranges else qat.ranges[name])
    scale, zero_point = FQ.activation_qparams(lo, hi)
    return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), 0, 255)


# ----------------------------------------------------------------------------------- Conv1D export
class Logits(nn.Module):
    """GPT-2 as a tensor-in, tensor-out model (what ONNX export and the int8 backends take)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):  # an explicit mask: without one GPT-2 looks for packed sequences (aten::diff, no ONNX op)
        return self.lm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


@pytest.fixture(scope="module")
def finalized_gpt2():
    """A tiny GPT-2 pruned (2:4 on its Conv1D projections) and quantization-aware trained, finalized."""
    model = Logits(tiny_gpt2())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match="lm_head"):
        manager = CompressionManager(
            GradualMagnitudePruning(None, start_step=0, end_step=2, update_every=1, granularity="2:4"),
            QuantizationAwareTraining(start_step=1),
        )
        manager.attach(model, optimizer)
    for ids in token_batches(4):
        nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return manager.finalize(model).eval()


def fake_quant_reference(model, ids):
    from compress_callbacks.quantization.ptq import fake_quantized

    with torch.no_grad(), fake_quantized(model):
        return model(ids)


def test_finalized_conv1d_specs_and_zeros(finalized_gpt2):
    specs = get_qparams(finalized_gpt2)
    names = conv1d_names(finalized_gpt2)
    assert sorted(specs) == sorted(names) and len(names) == 8
    for name in names:
        weight, spec = finalized_gpt2.get_submodule(name).weight.detach(), specs[name]
        assert spec.weight_axis == 1 and spec.weight_scale.shape == (weight.shape[1],)
        assert ((weight.t() != 0).reshape(-1, 4).sum(1) <= 2).all()  # the 2:4 pattern survived the grid


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:Exporting aten:UserWarning")
def test_conv1d_gpt2_to_int8_onnxruntime_matches_the_fake_quant_model(finalized_gpt2):
    from compress_callbacks.export import to_int8

    ids = token_batches(1, seed=9, shape=(2, 12))[0]
    reference = fake_quant_reference(finalized_gpt2, ids)
    int8_model = to_int8(finalized_gpt2, example_inputs=ids[:1])
    error = (int8_model(ids) - reference).abs().max()
    assert error <= 1e-3 * reference.abs().max(), float(error)


def test_conv1d_gpt2_int8_layers_for_inductor_match_the_fake_quant_model(finalized_gpt2):
    """The graph ``to_int8(backend="inductor")`` compiles (its Int8Layers), run eager."""
    from compress_callbacks.export.inductor import _int8_layers_copy

    ids = token_batches(1, seed=9, shape=(2, 12))[0]
    reference = fake_quant_reference(finalized_gpt2, ids)
    with torch.no_grad():
        error = (_int8_layers_copy(finalized_gpt2)(ids) - reference).abs().max()
    assert error <= 1e-4 * reference.abs().max(), float(error)


@pytest.mark.slow  # Inductor compiles the GPT-2 graph: ~45 s on two shared cores
def test_conv1d_gpt2_to_int8_inductor_matches_the_fake_quant_model(finalized_gpt2):
    from compress_callbacks.export import to_int8

    ids = token_batches(1, seed=9, shape=(2, 12))[0]
    reference = fake_quant_reference(finalized_gpt2, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no-VNNI saturation notice, Inductor's own
        int8_model = to_int8(finalized_gpt2, example_inputs=ids, backend="inductor")
    error = (int8_model(ids) - reference).abs().max()
    assert error <= 1e-2 * reference.abs().max(), float(error)  # 8-bit weights may saturate without VNNI


def test_conv1d_gpt2_save_compressed_round_trip(finalized_gpt2, tmp_path):
    from compress_callbacks.export import load_compressed, save_compressed

    save_compressed(finalized_gpt2, tmp_path / "gpt2.ccz")
    fresh = load_compressed(tmp_path / "gpt2.ccz", Logits(tiny_gpt2(seed=5)))
    ids = token_batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(fresh(ids), finalized_gpt2(ids))
    assert all(spec.weight_axis == 1 for spec in get_qparams(fresh).values())


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:Exporting aten:UserWarning")
def test_calibrate_quantizes_conv1d_per_output_column_and_int8_matches():
    from compress_callbacks.export import to_int8
    from compress_callbacks.quantization.ptq import calibrate

    batches = token_batches(2, seed=3)
    with pytest.warns(UserWarning, match="lm_head"):
        model = calibrate(Logits(tiny_gpt2()).eval(), batches, weight_bits=4)
    specs = get_qparams(model)
    assert sorted(specs) == sorted(conv1d_names(model))
    for name in conv1d_names(model):
        weight, spec = model.get_submodule(name).weight.detach(), specs[name]
        assert spec.weight_axis == 1 and not spec.weight_only
        codes = weight / spec.weight_scale[None, :]
        assert torch.allclose(codes, codes.round(), atol=1e-4) and int(codes.round().abs().amax()) == 7
    ids = batches[0]
    reference = fake_quant_reference(model, ids)
    error = (to_int8(model, example_inputs=ids[:1])(ids) - reference).abs().max()
    assert error <= 1e-3 * reference.abs().max(), float(error)
