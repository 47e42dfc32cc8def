"""QAT for language models (issue 16): group-wise weights, per-token dynamic activations, embeddings,
tied weights and the LM head, learned (LSQ) scales; with DDP, accumulation, resume, recipes, Trainer."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compress_callbacks import CompressionManager, QuantizationAwareTraining
from compress_callbacks.quantization import fake_quant as FQ
from compress_callbacks.quantization.grid import group_rows, weight_codes
from compress_callbacks.quantization.ptq import fake_quantized
from compress_callbacks.quantization.spec import LayerQuantSpec, dequantized_weight, get_qparams, quantize_weight

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, HIDDEN = 256, 64


def tiny_llama(seed: int = 0, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config)


def tokens(n: int = 4, batch: int = 2, length: int = 12, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, length), generator=g) for _ in range(n)]


def lm_step(model, optimizer, ids):
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def mlp(seed: int = 0, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 3))


def data(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


def train(model, optimizer, batches):
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()


W4G4_DYNAMIC = dict(weight_bits=4, weight_group_size=4, activation_scheme="dynamic")


# ------------------------------------------------------------------------------------ group-wise weights
def test_group_codes_are_per_channel_codes_of_the_grouped_view_and_match_torchao():
    from torchao.quantization.qat.utils import _fake_quantize_per_channel_group

    torch.manual_seed(0)
    w = torch.randn(6, 32)
    scale = FQ.per_group_weight_scale(w, 4, group_size=8)
    assert scale.shape == (6, 4)
    assert torch.equal(scale, (w.reshape(6, 4, 8).abs().amax(-1) / 7))
    codes = weight_codes(w, scale, 4)
    assert torch.equal(codes.reshape(6, 4, 8), weight_codes(group_rows(w, 8), scale.reshape(-1), 4).reshape(6, 4, 8))
    assert codes.abs().max() == 7 and torch.equal(codes, codes.round())
    ours = FQ.fake_quantize_weight_groups(w, 4, group_size=8)
    assert torch.equal(ours, dequantized_weight(codes, LayerQuantSpec(4, scale, weight_group_size=8)))
    theirs = _fake_quantize_per_channel_group(w, scale, torch.zeros_like(scale), -7, 7, 8)  # torchao's QAT primitive
    assert torch.equal(ours, theirs)
    # Transformers Conv1D stores [in, out]: groups run along dim 0
    assert torch.equal(weight_codes(w.t(), scale, 4, dim=1), codes.t())


def test_group_fake_quant_is_straight_through():
    w = torch.randn(4, 16, requires_grad=True)
    FQ.fake_quantize_weight_groups(w, 3, group_size=4).mul(torch.arange(16.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(16.0).expand(4, 16))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_finalize_with_groups_leaves_plain_linears_on_the_group_grid(bits):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    manager = CompressionManager(QuantizationAwareTraining(start_step=1, weight_bits=bits, weight_group_size=4))
    manager.attach(model, optimizer)
    train(model, optimizer, data())
    model.eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        trained = model(x)
        compressed = manager.finalize(model)
        with fake_quantized(compressed):
            reference = compressed(x)
    assert [type(m) for m in compressed] == [nn.Linear, nn.ReLU, nn.Linear]
    torch.testing.assert_close(trained, reference, rtol=0, atol=1e-5)
    for name, spec in get_qparams(compressed).items():
        weight = compressed.get_submodule(name).weight.detach()
        assert spec.weight_group_size == 4 and spec.weight_scale.shape == (weight.shape[0], weight.shape[1] // 4)
        expanded = spec.weight_scale.repeat_interleave(4, dim=1)
        codes = (weight / expanded).round()
        assert torch.equal(codes * expanded, weight), "the weight must be its codes times its group's scale"
        assert codes.abs().max() <= 2 ** (bits - 1) - 1
        assert torch.equal(quantize_weight(weight, spec).float(), codes)
    fresh = mlp(seed=3)
    fresh.load_state_dict(compressed.state_dict(), strict=True)


def test_group_size_that_does_not_divide_in_features_fails_before_anything_is_touched():
    model = mlp(width=12)  # layer "2" has in_features=12
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = CompressionManager(QuantizationAwareTraining(weight_group_size=8, learn_scales=True))
    with pytest.raises(ValueError, match=r"weight_group_size.*'0' has in_features=8|'2' has in_features=12") as info:
        manager.attach(model, optimizer)
    assert "'0'" in str(info.value) or "'2'" in str(info.value)
    assert len(optimizer.param_groups) == 1 and not manager.attached
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))


def test_group_size_on_a_conv_is_refused_naming_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    manager = CompressionManager(QuantizationAwareTraining(weight_group_size=4))
    with pytest.raises(ValueError, match="'0' is a Conv2d; group-wise scales are supported on nn.Linear"):
        manager.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert type(model[0]) is nn.Conv2d


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"weight_group_size": 1}, ValueError, "weight_group_size"),
        ({"weight_group_size": 32.0}, TypeError, "weight_group_size"),
        ({"activation_scheme": "per_token"}, ValueError, "activation_scheme"),
        ({"activation_scheme": "dynamic", "activation_bits": None}, ValueError, "activation_scheme"),
        ({"learn_scales": 1}, TypeError, "learn_scales"),
    ],
)
def test_bad_new_arguments_raise_naming_them(kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        QuantizationAwareTraining(**kwargs)
    assert info.value.argument == match


# ------------------------------------------------------------------------------------ dynamic activations
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_fake_quant_equals_torchaos_8da4w_activation_quantization(dtype):
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        _apply_int8_act_asym_per_token_quant_dequant as torchao_per_token,
    )

    torch.manual_seed(0)
    x = (torch.randn(3, 5, 64) * 3 + torch.randn(3, 5, 1)).to(dtype)
    x[0, 0] = 0.0  # an all-zero token
    x[1, 1] = x[1, 1].abs()  # an all-positive one
    assert torch.equal(FQ.fake_quantize_per_token(x), torchao_per_token(x))  # the deployed kernel's reference
    # gradients: torchao's QAT fake quantizer (the same values), straight through where nothing was clamped
    ours, theirs = x.float().clone().requires_grad_(), x.float().clone().requires_grad_()
    fake = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False))
    g = torch.randn_like(ours)
    (FQ.fake_quantize_per_token(ours) * g).sum().backward()
    (fake(theirs) * g).sum().backward()
    assert torch.equal(FQ.fake_quantize_per_token(ours.detach()), fake(theirs.detach()))
    torch.testing.assert_close(ours.grad, theirs.grad)


def test_dynamic_layers_quantize_each_token_at_run_time_with_nothing_observed_or_stored():
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        _apply_int8_act_asym_per_token_quant_dequant as torchao_per_token,
    )

    model = mlp()
    keys = list(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    qat = QuantizationAwareTraining(**W4G4_DYNAMIC)
    manager = CompressionManager(qat)
    manager.attach(model, optimizer)
    train(model, optimizer, data(3))
    assert dict(qat.ranges) == {} and list(model.state_dict()) == keys
    x = torch.randn(5, 8) * 4
    with torch.no_grad():
        weight = FQ.fake_quantize_weight_groups(model[0].weight, 4, 4)
        expected = F.linear(torchao_per_token(x), weight, model[0].bias)
        assert torch.equal(model[0](x), expected)
        # a token's output does not depend on the other tokens of the batch (a per-tensor range would)
        torch.testing.assert_close(model(x)[:2], model(x[:2]), rtol=0, atol=1e-6)
    compressed = manager.finalize(model)
    spec = get_qparams(compressed)["0"]
    assert (spec.activation_scheme, spec.activation_bits, spec.input_scale, spec.activation_qmin, spec.activation_qmax) == (
        "dynamic", 8, None, -128, 127)
    with torch.no_grad(), fake_quantized(compressed):
        assert torch.equal(compressed[0](x), expected)


# ------------------------------------------------------------------------------------ embeddings, tied weights, head
class TinyLM(nn.Module):
    def __init__(self, tie: bool = True, vocab: int = 20, width: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.body = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.body(self.embed(ids))))


@pytest.mark.parametrize("group_size", [None, 4])
def test_named_embedding_is_fake_quantized_per_row_or_group_weight_only(group_size):
    model = TinyLM(tie=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = CompressionManager(QuantizationAwareTraining(weight_bits=4, weight_group_size=group_size,
                                                           activation_bits=None, modules=["embed", "body"]))
    manager.attach(model, optimizer)
    ids = torch.tensor([[1, 5, 5, 19]])
    table = model.embed.weight.detach()
    grid = FQ.fake_quantize_weight(table, 4) if group_size is None else FQ.fake_quantize_weight_groups(table, 4, 4)
    out = model.embed(ids)
    assert torch.equal(out, grid[ids])  # the rows of the fake-quantized table
    out.sum().backward()
    assert torch.equal(model.embed.weight.grad[5], torch.full((8,), 2.0))  # straight through, counted per lookup
    optimizer.zero_grad()
    compressed = manager.finalize(model)
    spec = get_qparams(compressed)["embed"]
    assert type(compressed.embed) is nn.Embedding and spec.weight_only and spec.weight_group_size == group_size
    assert torch.equal(compressed.embed.weight, grid)
    assert torch.equal(dequantized_weight(quantize_weight(compressed.embed.weight, spec), spec), grid)


def test_embedding_with_max_norm_is_refused():
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="max_norm"):
        CompressionManager(QuantizationAwareTraining(modules=["0", "1"])).attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert type(model[0]) is nn.Embedding


@pytest.mark.parametrize("learn_scales", [False, True])
def test_tied_embedding_and_head_share_one_grid_and_are_snapped_once(learn_scales):
    model = TinyLM(tie=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    qat = QuantizationAwareTraining(weight_bits=4, weight_group_size=4, modules=["embed", "body", "head"],
                                    learn_scales=learn_scales)
    manager = CompressionManager(qat)
    manager.attach(model, optimizer)
    if learn_scales:
        assert len(qat.scale_parameters()) == 2  # one for the tied weight, one for body
    ids = torch.randint(0, 20, (3, 5))
    for _ in range(3):
        F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        expected = qat._layers[2].weight(model.head)  # the grid the head's forward computed with
        assert torch.equal(model.embed(ids), expected[ids])  # the embedding reads the same grid
    compressed = manager.finalize(model)
    specs = get_qparams(compressed)
    assert specs["head"].tied_to == "embed" and specs["embed"].tied_to is None
    assert torch.equal(specs["head"].weight_scale, specs["embed"].weight_scale)
    assert compressed.head.weight is compressed.embed.weight
    assert torch.equal(compressed.embed.weight, expected)  # on the trained grid: not re-quantized a second time


def test_tied_head_not_named_is_left_alone_with_a_warning():
    model = TinyLM(tie=True)
    with pytest.warns(UserWarning, match="skipping 'head'"):
        qat = QuantizationAwareTraining(modules=[nn.Linear])
        CompressionManager(qat).attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert [st.name for st in qat._layers] == ["body"]


def test_lm_head_stays_at_8_bits_unless_named():
    model = tiny_llama()
    with pytest.warns(UserWarning, match=r"keeping the output head \['lm_head'\] at 8-bit"):
        manager = CompressionManager(QuantizationAwareTraining(weight_bits=4, weight_group_size=32, activation_scheme="dynamic"))
        manager.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    specs = get_qparams(manager.finalize(model))
    assert specs["lm_head"].weight_bits == 8 and specs["model.layers.0.mlp.down_proj"].weight_bits == 4
    rows = {row["module"]: row for row in manager.callbacks[0].summary_rows()}  # the table as finalized
    assert (rows["lm_head"]["weight_bits"], rows["lm_head"]["input_bits"], rows["lm_head"]["weight_group"]) == (8, "8/token", 32)
    named = tiny_llama()
    manager = CompressionManager(QuantizationAwareTraining(weight_bits=4, activation_scheme="dynamic",
                                                           modules=["re:.*proj", "lm_head"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        manager.attach(named, torch.optim.SGD(named.parameters(), lr=0.1))
    assert get_qparams(manager.finalize(named))["lm_head"].weight_bits == 4


# ------------------------------------------------------------------------------------ learned scales
def test_learned_scale_gradients_are_lsq():
    torch.manual_seed(0)
    w = torch.randn(3, 8, requires_grad=True)
    s = nn.Parameter(FQ.per_group_weight_scale(w, 3, group_size=4) * 0.7)  # some codes clipped
    g = torch.randn(3, 8)
    (FQ.fake_quantize_weight_learned(w, s, 3) * g).sum().backward()
    x = (w.detach() / s.detach().repeat_interleave(4, 1))
    codes = x.round()
    inside = codes.abs() <= 3
    assert (~inside).any() and inside.any()
    assert torch.equal(w.grad, torch.where(inside, g, 0.0))
    slope = torch.where(inside, codes - x, codes.clamp(-3, 3))
    expected = (g * slope).reshape(3, 2, 4).sum(-1) / (4 * 3) ** 0.5
    torch.testing.assert_close(s.grad, expected)


def test_learned_scales_join_the_optimizer_start_from_min_max_and_train():
    model = mlp()
    decayed = [p for p in model.parameters() if p.dim() == 2]
    optimizer = torch.optim.AdamW([{"params": decayed}, {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}],
                                  lr=1e-3, weight_decay=0.1)
    qat = QuantizationAwareTraining(start_step=2, learn_scales=True, **W4G4_DYNAMIC)
    manager = CompressionManager(qat)
    manager.attach(model, optimizer)
    scales = qat.scale_parameters()
    assert len(scales) == 2 and len(optimizer.param_groups) == 2  # an LR scheduler made before keeps working
    assert optimizer.param_groups[1]["params"][2:] == scales  # joined the group without weight decay
    batches = data(6)
    train(model, optimizer, batches[:2])  # fake-quant starts now: scales from the weights as they are
    assert torch.equal(scales[0].detach(), FQ.per_group_weight_scale(model[0].weight.detach(), 4, 4))
    start = [s.detach().clone() for s in scales]
    train(model, optimizer, batches[2:])
    assert all(not torch.equal(a, b.detach()) for a, b in zip(start, scales))
    compressed = manager.finalize(model)
    spec = get_qparams(compressed)["0"]
    assert torch.equal(spec.weight_scale, scales[0].detach())
    expanded = spec.weight_scale.repeat_interleave(4, dim=1)
    codes = (compressed[0].weight.detach() / expanded).round()
    assert torch.equal(codes * expanded, compressed[0].weight.detach()) and codes.abs().max() <= 7
    assert torch.equal(quantize_weight(compressed[0].weight, spec).float(), codes)


def test_default_path_has_no_scales_and_no_pre_update_hook():
    qat = QuantizationAwareTraining(weight_bits=4)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    CompressionManager(qat).attach(model, optimizer)
    assert qat.scale_parameters() == [] and not qat.needs_before_update and len(optimizer.param_groups) == 1
    assert "scales" not in qat.state_dict()


def test_learned_scales_under_ddp_refuse_an_optimizer_without_step_hooks_before_touching_anything(monkeypatch):
    """Without a torch optimizer's pre-step hook nothing averages the scales' gradients over the ranks."""
    from compress_callbacks import _dist

    class BareOptimizer:  # steps itself; no torch step hooks
        def __init__(self, params):
            self.param_groups = [{"params": list(params), "lr": 0.1}]

    monkeypatch.setattr(_dist, "world_size", lambda: 2)
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    optimizer = BareOptimizer(model.parameters())
    manager = CompressionManager(QuantizationAwareTraining(learn_scales=True, **W4G4_DYNAMIC))
    with pytest.raises(ValueError, match="learn_scales=True under DDP needs a torch optimizer"):
        manager.attach(model, optimizer, hook=False)
    assert not manager.attached and len(optimizer.param_groups) == 1
    assert all(type(m) in (nn.Linear, nn.ReLU, nn.Sequential) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the same run with a torch optimizer (and hook=False) attaches: its pre-step hook averages
    other = mlp()
    accepted = CompressionManager(QuantizationAwareTraining(learn_scales=True, **W4G4_DYNAMIC))
    accepted.attach(other, torch.optim.SGD(other.parameters(), lr=0.1), hook=False)
    assert accepted.attached and accepted.has_before_update_hook

# ------------------------------------------------------------------------------------ what holds today holds here
def test_gradient_accumulation_matches_the_full_batch():
    """Per-token ranges and group-wise weights do not depend on the batch's make-up: two half batches
    (accumulated) give the update one full batch gives, learned scales included."""
    results = []
    for halves in (False, True):
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        qat = QuantizationAwareTraining(learn_scales=True, **W4G4_DYNAMIC)
        manager = CompressionManager(qat)
        manager.attach(model, optimizer)
        for x, y in data(3):
            parts = [(x[:2], y[:2]), (x[2:], y[2:])] if halves else [(x, y)]
            for xs, ys in parts:
                (F.cross_entropy(model(xs), ys, reduction="sum") / len(x)).backward()
            optimizer.step()
            optimizer.zero_grad()
        assert manager.step == 3
        results.append([p.detach().clone() for p in list(model.parameters()) + qat.scale_parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run():
    batches = data(6)

    def run(model, manager_state=None, model_state=None, optimizer_state=None, steps=batches):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        manager = CompressionManager(QuantizationAwareTraining(start_step=1, learn_scales=True, **W4G4_DYNAMIC))
        if manager_state is not None:
            model.load_state_dict(model_state)
            manager.load_state_dict(manager_state)
        manager.attach(model, optimizer)  # adds the scales' param group, then the optimizer state fits
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        train(model, optimizer, steps)
        return manager, optimizer

    full = mlp()
    full_manager, _ = run(full)
    half = mlp()
    manager, optimizer = run(half, steps=batches[:3])
    buffer = io.BytesIO()
    torch.save({"m": manager.state_dict(), "model": half.state_dict(), "opt": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = mlp(seed=7)
    resumed_manager, _ = run(resumed, saved["m"], saved["model"], saved["opt"], steps=batches[3:])
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full_manager.callbacks[0].scale_parameters(), resumed_manager.callbacks[0].scale_parameters()):
        assert torch.equal(a, b)


def test_state_without_learned_scales_is_refused():
    plain = CompressionManager(QuantizationAwareTraining(**W4G4_DYNAMIC))
    model = mlp()
    plain.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    learned = CompressionManager(QuantizationAwareTraining(learn_scales=True, **W4G4_DYNAMIC))
    with pytest.raises(ValueError, match="another plan"):  # the manager sees the plans differ
        learned.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="holds no learned scales"):  # and allowed to differ, the callback
        learned.load_state_dict(plain.state_dict(), allow_new_plan=True)


def test_recipe_round_trips_the_new_keys():
    qat = QuantizationAwareTraining(start_step=3, weight_bits=4, weight_group_size=32, activation_scheme="dynamic",
                                    learn_scales=True, exclude=["lm_head"])
    text = CompressionManager(qat).to_recipe_yaml()
    assert "weight_group_size: 32" in text and "activation_scheme: dynamic" in text and "learn_scales: true" in text
    rebuilt = CompressionManager.from_recipe(text).callbacks[0]
    assert rebuilt.config() == qat.config()
    with pytest.raises(ValueError, match="callbacks.QuantizationAwareTraining.weight_group_size"):
        CompressionManager.from_recipe({"callbacks": {"QuantizationAwareTraining": {"weight_group_size": 0}}})


def test_model_deep_copies_and_pickles_mid_training():
    model = TinyLM(tie=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    CompressionManager(QuantizationAwareTraining(weight_bits=4, weight_group_size=4, learn_scales=True,
                                                 modules=["embed", "body"])).attach(model, optimizer)
    ids = torch.randint(0, 20, (2, 3))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(model)(ids), model(ids))
        assert torch.equal(loaded(ids), model(ids))


def test_llama_8da4w_qat_finalized_model_matches_the_fake_quant_model():
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    qat = QuantizationAwareTraining(weight_bits=4, weight_group_size=32, activation_scheme="dynamic", learn_scales=True,
                                    modules=[nn.Linear, "model.embed_tokens"])
    manager = CompressionManager(qat)
    with pytest.warns(UserWarning, match="output head"):
        manager.attach(model, optimizer)
    losses = []
    for ids in tokens(4):
        losses.append(model(input_ids=ids, labels=ids).loss.item())
        lm_step(model, optimizer, ids)
    assert all(torch.isfinite(torch.tensor(losses)))
    model.eval()
    ids = tokens(1, seed=9)[0]
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        compressed = manager.finalize(model)
        with fake_quantized(compressed):
            reference = compressed(input_ids=ids).logits
    torch.testing.assert_close(trained, reference, rtol=0, atol=1e-4)
    specs = get_qparams(compressed)
    assert specs["model.embed_tokens"].weight_only and specs["model.embed_tokens"].weight_scale.shape == (VOCAB, HIDDEN // 32)
    assert specs["model.layers.1.self_attn.q_proj"].dynamic


def test_transformers_trainer_trains_llama_with_8da4w_and_learned_scales(tmp_path):
    from transformers import Trainer, TrainingArguments

    from compress_callbacks.integrations.transformers import CompressionCallback

    model = tiny_llama()
    qat = QuantizationAwareTraining(start_step=1, weight_bits=4, weight_group_size=32, activation_scheme="dynamic",
                                    learn_scales=True, exclude=["lm_head"])
    manager = CompressionManager(qat)
    dataset = [{"input_ids": row, "labels": row} for ids in tokens(8, batch=1) for row in ids]
    args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[CompressionCallback(manager)])
    trainer.train()
    assert manager.step == 4
    owned = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(s) in owned for s in qat.scale_parameters())
    assert all(s.grad is None or torch.isfinite(s.grad).all() for s in qat.scale_parameters())
    specs = get_qparams(manager.finalize(model))
    assert "lm_head" not in specs and specs["model.layers.0.mlp.up_proj"].weight_group_size == 32


def test_scale_gradients_do_not_pile_up_when_the_loop_zeroes_only_the_model():
    """The Trainer zeroes gradients with ``model.zero_grad()``; the scales are not the model's."""
    results = []
    for zero in ("optimizer", "model"):
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        qat = QuantizationAwareTraining(learn_scales=True, **W4G4_DYNAMIC)
        CompressionManager(qat).attach(model, optimizer)
        for x, y in data(3):
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            (optimizer if zero == "optimizer" else model).zero_grad()
        results.append([s.detach().clone() for s in qat.scale_parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def trainer_run(output_dir, resume=None, attach_first=False):
    """A Trainer run with learned scales: the callback attaches when ``train`` creates the optimizer, so
    that a resumed run's optimizer holds the scales when the Trainer loads its state (``attach_first``:
    the user attaches to ``trainer.create_optimizer()`` before ``train``, which must keep working)."""
    from transformers import Trainer, TrainingArguments

    from compress_callbacks.integrations.transformers import CompressionCallback

    model = tiny_llama()
    qat = QuantizationAwareTraining(start_step=1, weight_bits=4, weight_group_size=32, activation_scheme="dynamic",
                                    learn_scales=True, exclude=["lm_head"])
    manager = CompressionManager(qat)
    dataset = [{"input_ids": row, "labels": row} for ids in tokens(8, batch=1) for row in ids]
    args = TrainingArguments(str(output_dir), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
                             report_to=[], use_cpu=True, save_strategy="steps", save_steps=2, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[CompressionCallback(manager)])
    if attach_first:
        manager.attach(model, trainer.create_optimizer())
    trainer.train(resume_from_checkpoint=resume)
    assert manager.optimizer is trainer.optimizer.optimizer  # the Trainer's optimizer (under its Accelerate wrapper)
    return model, qat


@pytest.mark.parametrize("attach_first", [False, True], ids=["callback_attaches", "user_attaches_first"])
def test_transformers_trainer_resume_with_learned_scales_matches_an_uninterrupted_run(tmp_path, attach_first):
    full, full_qat = trainer_run(tmp_path, attach_first=attach_first)
    resumed, resumed_qat = trainer_run(tmp_path, resume=str(tmp_path / "checkpoint-2"), attach_first=attach_first)
    assert all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(full_qat.scale_parameters(), resumed_qat.scale_parameters()))
    saved = torch.load(tmp_path / "checkpoint-2" / "compression_state.pt", weights_only=True)
    at_checkpoint = saved["callbacks"]["0:QuantizationAwareTraining"]["scales"]
    assert any(not torch.equal(s, s2) for s, s2 in zip(resumed_qat.scale_parameters(), at_checkpoint))  # they trained on


# ------------------------------------------------------------------------------------ DDP
def _ddp_worker():
    import torch.distributed as dist
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    qat = QuantizationAwareTraining(start_step=1, learn_scales=True, **W4G4_DYNAMIC)
    manager = CompressionManager(qat, accelerator=accelerator)
    manager.attach(model, optimizer)
    g = torch.Generator().manual_seed(100 + accelerator.process_index)  # different data per rank
    for _ in range(4):
        x = torch.randn(4, 8, generator=g) * (1 + accelerator.process_index)
        y = torch.randint(0, 3, (4,), generator=g)
        accelerator.backward(F.cross_entropy(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
    local = torch.cat([p.detach().reshape(-1) for p in qat.scale_parameters()])
    gathered = [torch.zeros_like(local) for _ in range(2)]
    dist.all_gather(gathered, local)
    assert torch.equal(gathered[0], gathered[1]), "ranks disagree on the learned scales"
    compressed = manager.finalize(model)
    weights = torch.cat([compressed[0].weight.detach().reshape(-1), compressed[2].weight.detach().reshape(-1)])
    all_weights = [torch.zeros_like(weights) for _ in range(2)]
    dist.all_gather(all_weights, weights)
    assert torch.equal(all_weights[0], all_weights[1])


def test_ddp_two_processes_agree_on_learned_scales(launch_two_processes):
    launch_two_processes(_ddp_worker, timeout=240)


def _fsdp2_worker(path):
    """Two ranks, FSDP2 (``fully_shard``, gloo), groups + per-token inputs + learned scales, the same
    batches on both ranks: weights, scales and specs equal a single process's."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    reference = mlp(4)
    model = copy.deepcopy(reference)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    runs = []
    for net in (model, reference):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        qat = QuantizationAwareTraining(start_step=1, learn_scales=True, **W4G4_DYNAMIC)
        manager = CompressionManager(qat)
        manager.attach(net, optimizer)
        runs.append((manager, optimizer, qat))
    for x, y in data(5):
        for net, (_, optimizer, _) in zip((model, reference), runs):
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(runs[0][2].scale_parameters(), runs[1][2].scale_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    finalized, expected = runs[0][0].finalize(model), runs[1][0].finalize(reference)
    whole = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in finalized.state_dict().items()}
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(whole[key], value, rtol=1e-5, atol=1e-6)
    for name, spec in get_qparams(finalized).items():
        torch.testing.assert_close(spec.weight_scale, get_qparams(expected)[name].weight_scale, rtol=1e-5, atol=1e-7)
    with open(f"{path}/rank{dist.get_rank()}.txt", "w") as f:
        f.write("ok")


def test_fsdp2_groups_dynamic_and_learned_scales_match_a_single_process(tmp_path, launch_two_processes):
    launch_two_processes(_fsdp2_worker, tmp_path)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["ok", "ok"]


# ------------------------------------------------------------------------------------ other layer kinds
def test_gpt2_conv1d_groups_and_learned_scales_finalize_to_the_trained_model():
    """Transformers Conv1D stores [in, out]: groups run along its first dim."""
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    qat = QuantizationAwareTraining(weight_bits=4, weight_group_size=16, activation_scheme="dynamic", learn_scales=True)
    manager = CompressionManager(qat)
    with pytest.warns(UserWarning, match="skipping 'lm_head'"):  # tied to wte, not named: left alone
        manager.attach(model, optimizer)
    assert qat.scale_parameters()[0].shape == (96, 2)  # c_attn: [in 32, out 96], 2 groups per output
    for ids in tokens(3, length=8):
        lm_step(model, optimizer, ids)
    model.eval()
    ids = tokens(1, length=8, seed=5)[0]
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        compressed = manager.finalize(model)
        with fake_quantized(compressed):
            reference = compressed(input_ids=ids).logits
    torch.testing.assert_close(trained, reference, rtol=0, atol=1e-4)
    spec = get_qparams(compressed)["transformer.h.0.attn.c_attn"]
    weight = compressed.transformer.h[0].attn.c_attn.weight.detach()
    assert spec.weight_axis == 1 and spec.weight_scale.shape == (96, 2)
    codes = quantize_weight(weight, spec).float()
    assert torch.equal(dequantized_weight(codes, spec), weight) and codes.abs().max() <= 7


def test_learned_per_channel_scales_on_a_conv_with_folded_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    qat = QuantizationAwareTraining(weight_bits=4, learn_scales=True, freeze_bn_step=2)
    manager = CompressionManager(qat)
    manager.attach(model, optimizer)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        F.cross_entropy(model(torch.randn(8, 3, 6, 6, generator=g)), torch.randint(0, 3, (8,), generator=g)).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        trained = model(x)
        compressed = manager.finalize(model)
        with fake_quantized(compressed):
            reference = compressed(x)
    torch.testing.assert_close(trained, reference, rtol=0, atol=1e-4)
    spec = get_qparams(compressed)["0"]
    assert spec.bn == "1" and spec.weight_scale.shape == (4,)
    from compress_callbacks.quantization.grid import batchnorm_fold_factor

    folded = compressed[0].weight.detach() * batchnorm_fold_factor(compressed[1]).view(-1, 1, 1, 1)
    codes = (folded / spec.weight_scale.view(-1, 1, 1, 1)).round()
    torch.testing.assert_close(codes * spec.weight_scale.view(-1, 1, 1, 1), folded, rtol=0, atol=1e-6)
    assert codes.abs().max() <= 7  # the folded weight lies on the learned 4-bit grid


def test_lightning_trains_with_groups_dynamic_inputs_and_learned_scales(tmp_path):
    import lightning.pytorch as L
    from torch.utils.data import DataLoader, TensorDataset

    from compress_callbacks.integrations.lightning import CompressionCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    module = Module()
    qat = QuantizationAwareTraining(start_step=1, learn_scales=True, **W4G4_DYNAMIC)
    manager = CompressionManager(qat)
    g = torch.Generator().manual_seed(1)
    batches = DataLoader(TensorDataset(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)), batch_size=8)
    trainer = L.Trainer(max_steps=4, callbacks=[CompressionCallback(manager)], accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)
    start = None

    class Record(L.Callback):
        def on_train_batch_end(self, *args, **kwargs):
            nonlocal start
            if manager.step == 1:  # scales just initialised from the weights
                start = [s.detach().clone() for s in qat.scale_parameters()]

    trainer.callbacks.append(Record())
    trainer.fit(module, batches)
    assert manager.step == 4 and start is not None
    owned = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(s) in owned for s in qat.scale_parameters())
    assert all(not torch.equal(a, b.detach()) for a, b in zip(start, qat.scale_parameters()))  # trained
    specs = get_qparams(manager.finalize(module))
    assert specs["net.0"].activation_scheme == "dynamic" and specs["net.2"].weight_group_size == 4
