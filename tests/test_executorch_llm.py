"""export_executorch for the LLM schemes (issue 16): 8da4w and dynamic per-channel layers as XNNPACK's
dynamically quantized linears holding the trained codes; what XNNPACK cannot run stays float, named."""

import os
import warnings

import pytest
import torch
import torch.nn as nn

pytest.importorskip("executorch")
transformers = pytest.importorskip("transformers")

from compress_callbacks import CompressionManager, QuantizationAwareTraining  # noqa: E402
from compress_callbacks.export.executorch import DEFAULT_TOLERANCE, ExecuTorchModule, export_executorch  # noqa: E402
from compress_callbacks.quantization.ptq import fake_quantized  # noqa: E402
from compress_callbacks.quantization.spec import LayerQuantSpec, get_qparams, quantize_weight  # noqa: E402


def qat_trained(model, batches, **qat_kwargs):
    """``model`` after a few QAT steps on ``batches`` (inputs, or keyword-input dicts), finalized."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    manager = CompressionManager(QuantizationAwareTraining(start_step=0, **qat_kwargs))
    manager.attach(model, optimizer)
    for batch in batches:
        out = model(**batch) if isinstance(batch, dict) else model(batch)
        loss = out.loss if hasattr(out, "loss") and out.loss is not None else out.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return manager.finalize(model)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def float_bytes(model):
    return sum(p.numel() * 4 for p in model.parameters())


def fake_quant_output(model, x):
    with torch.no_grad(), fake_quantized(model):
        return model(x)


def relative_error(out, reference):
    return float((out - reference).abs().max() / (reference.max() - reference.min()))


def export_quietly(model, inputs, path, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_executorch(model, inputs, path, **kwargs)
    return result, [str(w.message) for w in caught if "export_executorch" in str(w.message)]


@pytest.mark.parametrize("bits, group, container", [(4, 32, 4), (2, 32, 4), (8, None, 8), (4, None, 4)])
def test_dynamic_linears_hold_the_trained_codes_and_match_the_fake_quant_model(tmp_path, bits, group, container):
    """8da4w (and 2-bit codes in XNNPACK's int4 groups, 4/8-bit per channel): delegated integer linears."""
    finalized = qat_trained(mlp(), [torch.randn(16, 64) for _ in range(3)], weight_bits=bits, weight_group_size=group,
                            activation_scheme="dynamic")
    qparams = get_qparams(finalized)
    x = torch.randn(8, 64)
    result, messages = export_quietly(finalized, x, tmp_path / "m.pte")
    assert result.float_layers == [] and not any("run in float" in m for m in messages)
    assert result.max_error <= DEFAULT_TOLERANCE and result.argmax_agreement >= 0.75
    weights = result.program.state_dict
    for name, spec in qparams.items():
        weight = weights[f"model.{name}.weight"]
        assert type(weight).__name__ == "IntxUnpackedToInt8Tensor" and weight.activation_quantization is not None
        assert torch.equal(weight.qdata, quantize_weight(finalized.get_submodule(name).weight, spec))  # the trained codes
        assert weight.target_dtype == getattr(torch, f"int{container}")  # XNNPACK's qbint4 / qcint4 / qcint8
        assert int(weight.qdata.abs().max()) <= 2 ** (bits - 1)
    assert result.size_bytes < 0.45 * float_bytes(finalized)  # integer weights in the file, not float ones
    out = ExecuTorchModule(result.path)(x)
    assert relative_error(out, fake_quant_output(finalized, x)) <= DEFAULT_TOLERANCE


def test_weight_only_and_groups_xnnpack_cannot_run_stay_float_and_are_named(tmp_path):
    """int4 weight-only in groups: XNNPACK has no weight-only integer linear; 4-bit dynamic groups of 16:
    XNNPACK needs multiples of 32. Both run in float on their trained grid (the same values)."""
    batches = [torch.randn(16, 64) for _ in range(3)]
    weight_only = qat_trained(mlp(1), batches, weight_bits=4, weight_group_size=32, activation_bits=None)
    x = torch.randn(4, 64)
    result, messages = export_quietly(weight_only, x, tmp_path / "wo.pte")
    assert result.float_layers == ["0", "2", "4"]
    assert any("run in float" in m and "4 (weight-only" in m for m in messages)
    with torch.no_grad():
        assert relative_error(ExecuTorchModule(result.path)(x), weight_only(x)) <= 1e-5  # float on the grid: exact
    small_groups = qat_trained(mlp(2), batches, weight_bits=4, weight_group_size=16, activation_scheme="dynamic")
    result, messages = export_quietly(small_groups, x, tmp_path / "g16.pte")
    assert result.float_layers == ["0", "2", "4"] and any("multiple of 32 (groups of 16)" in m for m in messages)
    assert result.max_error <= DEFAULT_TOLERANCE  # only the per-token input rounding is missing


def test_refusals_name_the_layer_and_write_nothing(tmp_path):
    batches = [torch.randn(16, 64) for _ in range(2)]
    live = mlp(3)
    optimizer = torch.optim.SGD(live.parameters(), lr=0.01)
    CompressionManager(QuantizationAwareTraining(start_step=0, weight_bits=4, weight_group_size=32,
                                                 activation_scheme="dynamic")).attach(live, optimizer)
    live(batches[0]).sum().backward()
    with pytest.raises(ValueError, match="finalize"):
        export_executorch(live, batches[0], tmp_path / "live.pte")
    grouped = qat_trained(mlp(5), batches, weight_bits=4, weight_group_size=32, activation_scheme="dynamic")
    with pytest.raises(ValueError, match="example_inputs"):
        export_executorch(grouped, torch.randn(8, 63), tmp_path / "shape.pte")
    mixed = qat_trained(mlp(4), batches, weight_bits=4, weight_group_size=32, activation_scheme="dynamic")
    mixed.compress_qparams["2"] = LayerQuantSpec(weight_bits=8, weight_scale=torch.full((64,), 0.01), activation_bits=8,
                                                 input_scale=0.05, input_zero_point=0)
    with pytest.raises(ValueError, match=r"layer '2' has static per-tensor input ranges while other layers use the LLM"):
        export_executorch(mixed, batches[0], tmp_path / "mixed.pte")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------ a causal LM
def small_llama(tied, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config)


def llama_logits(model, ids):
    with torch.no_grad(), fake_quantized(model):
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module", params=[False, True], ids=["untied-8bit-head", "tied-4bit-head"])
def llama_export(request, tmp_path_factory):
    """Untied: QAT's default keeps the head at 8 bits (groups of 32: XNNPACK has no kernel, so float).
    Tied: head and embedding named, quantized once at 4 bits; the head runs 8da4w, the lookup float."""
    tied = request.param
    model = small_llama(tied)
    modules = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] + ["model.embed_tokens"] if tied else None
    ids = [torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # QAT's note on the head kept at 8 bits
        finalized = qat_trained(model, [{"input_ids": x, "labels": x} for x in ids], weight_bits=4, weight_group_size=32,
                                activation_scheme="dynamic", modules=modules)
    example = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))
    result, messages = export_quietly(finalized, example, tmp_path_factory.mktemp("llama") / "llama.pte")
    return finalized, example, result, messages


def test_llama_8da4w_program_holds_the_trained_codes_and_matches_the_fake_quant_model(llama_export):
    finalized, example, result, messages = llama_export
    qparams = get_qparams(finalized)
    head = qparams["lm_head"]
    if head.tied_to is None:
        assert head.weight_bits == 8 and result.float_layers == ["lm_head"]
        assert any("lm_head (XNNPACK runs groups of 4-bit codes only (8-bit))" in m for m in messages)
    else:
        assert head.tied_to == "model.embed_tokens" and head.weight_bits == 4
        assert result.float_layers == ["model.embed_tokens"] and any("an embedding" in m for m in messages)
        assert torch.equal(result.program.state_dict["model.lm_head.weight"].qdata,
                           quantize_weight(finalized.lm_head.weight, head))
    assert result.max_error <= DEFAULT_TOLERANCE and result.argmax_agreement >= 0.9
    q_proj = "model.layers.0.self_attn.q_proj"
    weight = result.program.state_dict[f"model.{q_proj}.weight"]
    assert tuple(weight.block_size) == (1, 32)
    assert torch.equal(weight.qdata, quantize_weight(finalized.get_submodule(q_proj).weight, qparams[q_proj]))


def test_llama_program_runs_shorter_sequences_and_refuses_longer_ones(llama_export):
    """The sequence axis is symbolic up to the example's length (ExecuTorch plans memory for the longest)."""
    finalized, example, result, _ = llama_export
    program = ExecuTorchModule(result.path)
    assert program.input_shapes == [tuple(example.shape)]
    for length in (16, 9):
        ids = example[:, :length]
        logits = program(ids)
        assert logits.shape == (2, length, 128)
        assert relative_error(logits, llama_logits(finalized, ids)) <= DEFAULT_TOLERANCE
    with pytest.raises(ValueError, match="do not fit"):
        program(torch.randint(0, 128, (2, 17)))


class FixedLength(nn.Module):
    """Token ids [batch, 16] -> flattened embeddings -> a Linear: the graph fixes the sequence length."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.fc = nn.Embedding(32, 8), nn.Linear(16 * 8, 32)

    def forward(self, ids):
        return self.fc(self.embed(ids).flatten(1))


def test_a_model_that_fixes_the_sequence_length_gets_a_fixed_program_and_says_so(tmp_path):
    ids = [torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    finalized = qat_trained(FixedLength(), ids, weight_bits=4, weight_group_size=32, activation_scheme="dynamic", modules=["fc"])
    result, messages = export_quietly(finalized, ids[0], tmp_path / "fixed.pte")
    assert any("could not be made symbolic" in m and "(4, 16)" in m for m in messages)
    assert result.float_layers == [] and result.max_error <= DEFAULT_TOLERANCE
    program = ExecuTorchModule(result.path)
    assert relative_error(program(ids[1]), fake_quant_output(finalized, ids[1])) <= DEFAULT_TOLERANCE
    with pytest.raises(ValueError, match=r"do not fit the program"):
        program(ids[1][:, :9])
