"""shrink(): pruned channels removed physically, outputs unchanged."""

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from compress_callbacks.pruning.groups import trace_groups
from compress_callbacks.export import shrink

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_inference import make_resnet  # noqa: E402
from structured_models import ConvBlock, Grouped, HeadNormAttention, Residual  # noqa: E402


def randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


@torch.no_grad()
def prune_whole(model, example_inputs, every=2):
    """Zero every slice (weight rows, biases, BatchNorm channels) of every ``every``-th prunable unit."""
    groups = trace_groups(model, example_inputs)
    tensors = dict(model.named_parameters())
    chosen = groups.prunable()[::every]
    for unit in chosen:
        for name, dim, index in unit.slices:
            if name in tensors:
                tensors[name].select(dim, index).zero_()
    return chosen


def params(model):
    return sum(p.numel() for p in model.parameters())


PATTERNS = {
    "linear-act-linear": (lambda: nn.Sequential(nn.Linear(10, 20), nn.GELU(), nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 3)),
                          lambda: torch.randn(3, 10)),
    "conv-bn-act-conv": (lambda: randomize_bn(ConvBlock()), lambda: torch.randn(2, 3, 6, 6)),
    "residual": (lambda: randomize_bn(Residual()), lambda: torch.randn(2, 3, 6, 6)),
    "depthwise-grouped-flatten": (lambda: Grouped(), lambda: torch.randn(2, 3, 2, 2)),
    "resnet": (lambda: randomize_bn(make_resnet(8)), lambda: torch.randn(2, 3, 16, 16)),
    "attention-heads": (lambda: HeadNormAttention(), lambda: torch.randn(2, 5, 16)),
}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_shrunk_model_is_smaller_and_computes_the_same(pattern):
    torch.manual_seed(0)
    make, inputs = PATTERNS[pattern]
    model, x = make().eval(), inputs()
    chosen = prune_whole(model, x)
    assert chosen
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every pruned channel can go: no warning
        small = shrink(model, x)
    assert params(small) < params(model)
    assert [type(m) for m in small.modules()] == [type(m) for m in model.modules()]
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
    fresh = torch.randn_like(x)  # not only on the inputs it was traced with
    torch.testing.assert_close(small(fresh), model(fresh), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    for m in small.modules():
        if isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features)
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups)
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean.shape == (m.num_features,)


def test_shrunk_model_matches_on_new_inputs_too():
    torch.manual_seed(1)
    model = randomize_bn(make_resnet(8))
    prune_whole(model, torch.randn(1, 3, 16, 16))
    small = shrink(model, torch.randn(1, 3, 16, 16))
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].out_channels < 8


def test_channel_with_a_live_bias_is_kept_and_named():
    """Conv rows zeroed but not their BatchNorm channel: a constant reaches the padded conv2, so the
    channels stay and the warning names the layer."""
    torch.manual_seed(0)
    model = ConvBlock().eval()
    with torch.no_grad():
        model.conv1.weight[:3] = 0
        model.bn1.bias[:3] = 0.2  # BN still adds its beta: the padded conv2 turns it into a border pattern
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match=r"conv1: 3 pruned channel\(s\) kept"):
        small = shrink(model, x)
    assert small.conv1.out_channels == 6
    torch.testing.assert_close(small(x), model(x))


def test_channels_normalised_together_are_kept_with_a_warning():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight[0] = 0
        model[0].bias[0] = 0
    with pytest.warns(UserWarning, match="0: 1 pruned channel.*layer_norm"):
        small = shrink(model, torch.randn(2, 4))
    assert small[0].out_features == 6


def test_unsupported_pattern_raises_before_any_change():
    class Sorts(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.sort(self.a(x), dim=-1).values)

    model = Sorts()
    with torch.no_grad():
        model.a.weight[0] = 0
        model.a.bias[0] = 0
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"\['a'\].*sort"):
        shrink(model, torch.randn(2, 4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_code_that_fixes_a_size_is_caught_before_anything_is_returned():
    model = HeadNormAttention(fixed_heads=True)  # view(..., 4, 4): the head count is written in the code
    x = torch.randn(2, 5, 16)
    prune_whole(model, x)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="does not run.*fixes a size"):
        shrink(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 8), nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x, y=None):
        return self.out(torch.relu(self.a(x) + self.b(y)))


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_example_inputs_as_tuple_or_dict(form):
    torch.manual_seed(0)
    model = TwoInputs()
    x, y = torch.randn(2, 4), torch.randn(2, 3)
    inputs = (x, y) if form == "tuple" else {"x": x, "y": y}
    chosen = prune_whole(model, inputs)
    assert {frozenset(u.producers) for u in chosen} == {frozenset({"a.weight", "b.weight"})}  # the add joins a and b
    small = shrink(model, inputs)
    assert small.a.out_features == small.b.out_features == small.out.in_features == 4
    torch.testing.assert_close(small(x, y), model(x, y))


def test_bad_example_inputs_name_the_argument():
    with pytest.raises(TypeError, match="example_inputs"):
        shrink(nn.Linear(2, 2), 3.0)


# ------------------------------------------------------------------ GradualMagnitudePruning, channel granularity
from compress_callbacks import CompressionManager, GradualMagnitudePruning  # noqa: E402


def train_channel_gmp(model, x, steps=6, **kwargs):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    options = dict(start_step=0, end_step=4, update_every=2, granularity="channel")
    options.update(kwargs)
    gmp = GradualMagnitudePruning(0.5, **options)
    manager = CompressionManager(gmp)
    manager.attach(model, optimizer)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        model(torch.randn(x.shape, generator=g)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return gmp, manager


def zero_rows(weight):
    return (weight.detach().reshape(weight.shape[0], -1) == 0).all(1)


def test_gmp_channel_prunes_coupled_channels_whole_and_shrink_removes_them():
    torch.manual_seed(0)
    model = randomize_bn(Residual()).train()
    x = torch.randn(2, 3, 6, 6)
    gmp, manager = train_channel_gmp(model, x, exclude=["head"])
    model = manager.finalize(model).eval()
    stem, conv = zero_rows(model.stem.weight), zero_rows(model.conv.weight)
    assert int(stem.sum()) == 4 and torch.equal(stem, conv)  # the channels that meet at the add go together
    assert bool((model.bn.weight[stem] == 0).all() and (model.bn.bias[stem] == 0).all())  # BN channel pruned too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = shrink(model, x)
    assert small.stem.out_channels == small.conv.out_channels == small.bn.num_features == small.head.in_channels == 4
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


def test_gmp_channel_bias_and_batchnorm_masked_so_padded_convs_shrink_exactly():
    torch.manual_seed(0)
    model = randomize_bn(ConvBlock()).train()
    x = torch.randn(2, 3, 6, 6)
    gmp, manager = train_channel_gmp(model, x, exclude=["conv2"])
    model = manager.finalize(model).eval()
    pruned = zero_rows(model.conv1.weight)
    assert int(pruned.sum()) == 3
    assert bool((model.conv1.bias[pruned] == 0).all() and (model.bn1.bias[pruned] == 0).all())
    small = shrink(model, x)
    assert small.conv1.out_channels == 3
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


def test_gmp_channel_keeps_per_row_selection_where_groups_cannot_go_and_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6))
    with pytest.warns(UserWarning, match=r"\b2 keep per-row channel selection.*reaches the model's output"):
        gmp, _ = train_channel_gmp(model, torch.randn(4, 8))
    assert gmp.layer_sparsities() == {"0": 0.5, "2": 0.5}
    assert int((model[0].bias == 0).sum()) == 8 and int((model[2].bias == 0).sum()) == 0  # only whole units own biases


def test_gmp_channel_global_scope_ranks_units_by_rms_within_the_budget():
    torch.manual_seed(0)
    model = make_resnet(8)
    x = torch.randn(2, 3, 16, 16)
    gmp, _ = train_channel_gmp(model, x, scope="global", exclude=["13"])
    total = sum(p.numel() for p in gmp._params)
    zeros = sum(int((p == 0).sum()) for p in gmp._params)
    assert 0.4 * total < zeros <= 0.5 * total
    per_layer = list(gmp.layer_sparsities().values())
    assert max(per_layer) - min(per_layer) > 0.05  # global: layers differ
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no family is emptied: everything pruned can go
        small = shrink(model.eval(), x)
    assert params(small) < params(model)
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


def test_gmp_channel_resume_restores_weight_bias_and_batchnorm_masks():
    torch.manual_seed(0)
    model = randomize_bn(ConvBlock()).train()
    x = torch.randn(2, 3, 6, 6)
    gmp, manager = train_channel_gmp(model, x, steps=3, exclude=["conv2"])
    state = manager.state_dict()
    fresh = GradualMagnitudePruning(0.5, start_step=0, end_step=4, update_every=2, granularity="channel", exclude=["conv2"])
    resumed = CompressionManager(fresh)
    resumed.load_state_dict(state)
    resumed.attach(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    assert all(torch.equal(a, b) for a, b in zip(fresh._keeps, gmp._keeps))
    assert fresh._owned_keeps.keys() == gmp._owned_keeps.keys() == {"conv1.bias", "bn1.weight", "bn1.bias"}
    assert all(torch.equal(fresh._owned_keeps[k], gmp._owned_keeps[k]) for k in gmp._owned_keeps)


def test_gmp_channel_first_selection_waits_for_the_first_batch():
    """initial_sparsity at step 0: the groups need inputs, so the masks land just before the first forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6))
    gmp = GradualMagnitudePruning(0.5, start_step=0, end_step=4, initial_sparsity=0.25, granularity="channel", exclude=["2"])
    CompressionManager(gmp).attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert int(zero_rows(model[0].weight).sum()) == 0
    x = torch.randn(4, 8)
    first = model(x)
    assert int(zero_rows(model[0].weight).sum()) == 4
    torch.testing.assert_close(first, model(x))  # the first forward already ran on the pruned weights

def _ddp_channel_worker(path):
    """Two ranks with different batches (so each traces its own first batch): the masks agree."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(randomize_bn(Residual()).train())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gmp = GradualMagnitudePruning(0.5, start_step=0, end_step=4, update_every=2, granularity="channel", exclude=["head"])
    CompressionManager(gmp).attach(model, optimizer)
    g = torch.Generator().manual_seed(10 + dist.get_rank())
    for _ in range(5):
        model(torch.randn(2, 3, 6, 6, generator=g)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    masks = torch.cat([k.flatten() for k in gmp._keeps] + [gmp._owned_keeps[n].flatten() for n in sorted(gmp._owned_keeps)])
    gathered = [torch.empty_like(masks) for _ in range(2)]
    dist.all_gather(gathered, masks)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    all_weights = [torch.empty_like(weights) for _ in range(2)]
    dist.all_gather(all_weights, weights)
    ok = torch.equal(gathered[0], gathered[1]) and torch.equal(all_weights[0], all_weights[1]) and int((masks == 0).sum()) > 0
    with open(f"{path}/rank{dist.get_rank()}.txt", "w") as f:
        f.write("ok" if ok else "differ")


def test_gmp_channel_ranks_agree_under_ddp(tmp_path, launch_two_processes):
    launch_two_processes(_ddp_channel_worker, tmp_path)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["ok", "ok"]


# ------------------------------------------------------------------ Transformers: FFN neurons and attention heads
def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=64, vocab_size=100))


def token_batch(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 8, dtype=torch.long)
    mask[-1, 6:] = 0  # padding
    return {"input_ids": torch.randint(0, 100, (batch, 8), generator=g), "attention_mask": mask}


def train_transformer(model, *callbacks, steps=5):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    manager = CompressionManager(*callbacks)
    manager.attach(model, optimizer)
    model.train()
    for step in range(steps):
        out = model(**token_batch(step, batch=4))
        (out.logits if hasattr(out, "logits") else out.last_hidden_state).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return manager.finalize(model).eval()


def heads_pruned(weight, head_dim):
    return zero_rows(weight).view(-1, head_dim).all(1)


def test_llama_gqa_heads_and_gated_ffn_pruned_whole_shrunk_and_saved(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    heads = GradualMagnitudePruning(0.5, start_step=0, end_step=2, update_every=1, granularity="head",
                                    modules="re:.*self_attn\\.(q|k|v)_proj")
    ffn = GradualMagnitudePruning(0.5, start_step=0, end_step=2, update_every=1, granularity="channel",
                                  modules="re:.*mlp\\.(gate|up)_proj")
    model = train_transformer(model, heads, ffn)
    for layer in model.model.layers:
        kv_gone = heads_pruned(layer.self_attn.k_proj.weight, 8)
        assert int(kv_gone.sum()) == 1 and torch.equal(kv_gone, heads_pruned(layer.self_attn.v_proj.weight, 8))
        assert torch.equal(heads_pruned(layer.self_attn.q_proj.weight, 8), kv_gone.repeat_interleave(2))  # its 2 query heads
        assert torch.equal(zero_rows(layer.mlp.gate_proj.weight), zero_rows(layer.mlp.up_proj.weight))  # gate and up together
        assert int(zero_rows(layer.mlp.gate_proj.weight).sum()) == 32
    inputs = token_batch(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = shrink(model, inputs)
    attention = small.model.layers[0].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.o_proj.in_features) == (16, 8, 16)
    assert small.model.layers[0].mlp.down_proj.in_features == 32
    assert (small.config.num_attention_heads, small.config.num_key_value_heads, small.config.intermediate_size) == (2, 1, 32)
    torch.testing.assert_close(small(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)
    small.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_bert_ffn_neurons_shrink_and_the_config_round_trips(tmp_path):
    from transformers import AutoModel

    model = train_transformer(tiny_bert(), GradualMagnitudePruning(
        0.5, start_step=0, end_step=2, update_every=1, granularity="channel", modules="re:.*intermediate\\.dense"))
    inputs = token_batch(3)
    small = shrink(model, inputs)
    assert small.config.intermediate_size == 32 and small.encoder.layer[1].output.dense.in_features == 32
    torch.testing.assert_close(small(**inputs).last_hidden_state, model(**inputs).last_hidden_state, rtol=1e-5, atol=1e-5)
    small.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(**inputs).last_hidden_state, model(**inputs).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_bert_heads_shrink_and_load_by_state_dict_when_the_config_cannot_say_it():
    from compress_callbacks.export import load_shrunk

    with pytest.warns(UserWarning, match=r"intermediate\.dense.*have no attention heads and stay dense"):
        model = train_transformer(tiny_bert(), GradualMagnitudePruning(
            0.25, start_step=0, end_step=2, update_every=1, granularity="head"), steps=3)
    assert int(zero_rows(model.encoder.layer[0].intermediate.dense.weight).sum()) == 0
    for layer in model.encoder.layer:
        assert int(heads_pruned(layer.attention.self.value.weight, 8).sum()) == 1
    inputs = token_batch(5)
    with pytest.warns(UserWarning, match="BertConfig cannot describe.*head size.*load_shrunk"):
        small = shrink(model, inputs)
    assert small.encoder.layer[0].attention.self.num_attention_heads == 3
    torch.testing.assert_close(small(**inputs).last_hidden_state, model(**inputs).last_hidden_state, rtol=1e-5, atol=1e-5)
    fresh = load_shrunk(tiny_bert().eval(), small.state_dict())
    torch.testing.assert_close(fresh(**inputs).last_hidden_state, model(**inputs).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_layers_of_different_widths_are_named_in_the_config_warning():
    model = tiny_llama().eval()
    with torch.no_grad():  # layer 0 loses 16 FFN neurons, layer 1 none
        for proj in ("gate_proj", "up_proj"):
            getattr(model.model.layers[0].mlp, proj).weight[:16] = 0
    with pytest.warns(UserWarning, match=r"FFN layers keep different widths \[48, 64\]"):
        small = shrink(model, token_batch(1))
    assert small.config.intermediate_size == 64 and small.model.layers[0].mlp.intermediate_size == 48


def test_gmp_channel_on_a_model_that_cannot_be_traced_falls_back_to_rows_and_says_so():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h if float(h.detach().sum()) > 0 else -h)  # data-dependent: torch.export cannot trace it

    torch.manual_seed(0)
    model = Branchy()
    with pytest.warns(UserWarning, match="could not be traced"):
        gmp, _ = train_channel_gmp(model, torch.randn(4, 8))
    assert gmp.layer_sparsities() == {"a": 0.5, "b": 0.5} and gmp._owned_keeps == {}


def test_gmp_channel_leaves_attention_projections_to_head_pruning():
    with pytest.warns(UserWarning, match=r"query.*project attention heads and stay dense"):
        model = train_transformer(tiny_bert(), GradualMagnitudePruning(
            0.5, start_step=0, end_step=2, update_every=1, granularity="channel"), steps=3)
    attention = model.encoder.layer[0].attention.self
    assert all(int(zero_rows(layer.weight).sum()) == 0 for layer in (attention.query, attention.key, attention.value))
    assert int(zero_rows(model.encoder.layer[0].intermediate.dense.weight).sum()) == 32  # FFN neurons: pruned whole
