"""to_torchao: torchao quantized weights that hold exactly the codes training produced."""

import pytest
import torch
import torch.nn as nn

from compress_callbacks import CompressionManager, QuantizationAwareTraining
from compress_callbacks.export import to_torchao
from compress_callbacks.quantization.spec import get_qparams, quantize_weight


def qat_trained(model, batches, **qat_kwargs):
    """``model`` after a few QAT steps on ``batches`` (a list of inputs, or of keyword-input dicts), finalized."""
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
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.mark.parametrize("bits, tensor", [(8, "Int8Tensor"), (4, "IntxUnpackedToInt8Tensor"), (2, "IntxUnpackedToInt8Tensor")])
def test_weight_only_codes_are_the_trained_codes_and_outputs_match(bits, tensor):
    finalized = qat_trained(mlp(), [torch.randn(16, 32) for _ in range(4)], weight_bits=bits, activation_bits=None)
    qparams = get_qparams(finalized)
    converted = to_torchao(finalized)
    for name, spec in qparams.items():
        weight = converted.get_submodule(name).weight
        assert type(weight).__name__ == tensor
        assert torch.equal(weight.qdata, quantize_weight(finalized.get_submodule(name).weight, spec))
        assert int(weight.qdata.abs().max()) <= 2 ** (bits - 1) - 1
    x = torch.randn(8, 32)
    with torch.no_grad():
        reference = finalized(x)  # weight-only: the finalized weights lie on the trained grid
        torch.testing.assert_close(converted(x), reference, rtol=0, atol=1e-5 * float(reference.abs().max()))
    assert not hasattr(converted, "compress_qparams") and hasattr(finalized, "compress_qparams")  # a copy by default


def test_the_converted_model_runs_under_torch_compile():
    finalized = qat_trained(mlp(1), [torch.randn(16, 32) for _ in range(3)], weight_bits=4, activation_bits=None)
    converted = to_torchao(finalized)
    compiled = torch.compile(converted)
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), converted(x), rtol=1e-5, atol=1e-5)


def test_static_input_ranges_are_refused_naming_the_layer_and_nothing_changes():
    finalized = qat_trained(mlp(2), [torch.randn(16, 32) for _ in range(2)])  # static int8 activations (the default)
    before = {k: v.clone() for k, v in finalized.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer '0'.*static per-tensor.*to_int8.*activation_scheme='dynamic'"):
        to_torchao(finalized, inplace=True)
    after = finalized.state_dict()
    assert all(type(after[k]) is torch.Tensor and torch.equal(after[k], v) for k, v in before.items())
    assert get_qparams(finalized)


def test_a_model_still_in_training_is_refused():
    model = mlp(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    CompressionManager(QuantizationAwareTraining(start_step=0, activation_bits=None)).attach(model, optimizer)
    model(torch.randn(4, 32)).sum().backward()
    optimizer.step()
    with pytest.raises(ValueError, match="finalize"):
        to_torchao(model)


def test_convolutions_are_refused_with_the_converters_that_run_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    finalized = qat_trained(model, [torch.randn(4, 3, 6, 6) for _ in range(2)], activation_bits=None)
    with pytest.raises(ValueError, match=r"layer '0' is a Conv2d.*to_int8 or export_executorch"):
        to_torchao(finalized)


def test_tied_weights_are_refused():
    torch.manual_seed(0)
    model = mlp(4)
    finalized = qat_trained(model, [torch.randn(16, 32) for _ in range(2)], activation_bits=None)
    finalized.add_module("head_alias", finalized[4])  # the same Linear under a second name
    finalized.tied = nn.Linear(64, 10)
    finalized.tied.weight = finalized[4].weight
    with pytest.raises(ValueError, match=r"layer '4' shares its weight with \['tied'\]"):
        to_torchao(finalized)


# ------------------------------------------------------------------ a Transformers causal LM
transformers = pytest.importorskip("transformers")


def small_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def llama_pair():
    ids = [torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    finalized = qat_trained(small_llama(), [{"input_ids": x, "labels": x} for x in ids],
                            weight_bits=4, activation_bits=None, exclude=["lm_head"])
    return finalized, to_torchao(finalized)


def test_llama_logits_match_the_fake_quant_model_and_generate_works(llama_pair):
    finalized, converted = llama_pair
    projections = [m for n, m in converted.named_modules() if n.endswith("q_proj")]
    assert projections and all(type(m.weight).__name__ == "IntxUnpackedToInt8Tensor" for m in projections)
    assert type(converted.lm_head.weight) is nn.Parameter and type(converted.lm_head.weight.data) is torch.Tensor
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference, logits = finalized(input_ids=ids).logits, converted(input_ids=ids).logits
    span = float(reference.max() - reference.min())
    assert float((logits - reference).abs().max()) <= 1e-5 * span  # weight-only: the same float computation
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))
    generated = converted.generate(ids[:1, :6], max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, finalized.generate(ids[:1, :6], max_new_tokens=6, do_sample=False))


def test_llama_save_pretrained_and_from_pretrained_round_trip(llama_pair, tmp_path):
    _, converted = llama_pair
    converted.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    weight = loaded.model.layers[0].mlp.down_proj.weight
    assert type(weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert torch.equal(weight.qdata, converted.model.layers[0].mlp.down_proj.weight.qdata)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, converted(input_ids=ids).logits)


def small_tied_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config)


def test_8da4w_groups_and_a_tied_embedding_head_match_the_fake_quant_model():
    """int4 weights in groups of 16 with per-token int8 inputs; embedding and head tied, quantized once."""
    from compress_callbacks.quantization.ptq import fake_quantized

    model = small_tied_llama()
    ids = [torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] + ["model.embed_tokens"]
    finalized = qat_trained(model, [{"input_ids": x, "labels": x} for x in ids], weight_bits=4, weight_group_size=16,
                            activation_scheme="dynamic", modules=names)
    qparams = get_qparams(finalized)
    assert qparams["lm_head"].tied_to == "model.embed_tokens" and qparams["lm_head"].weight_group_size == 16
    converted = to_torchao(finalized)
    head, embed = converted.lm_head.weight, converted.model.embed_tokens.weight
    assert head is embed and type(head).__name__ == "IntxUnpackedToInt8Tensor"  # one tensor for both layers
    assert head.activation_quantization is not None and tuple(head.block_size) == (1, 16)
    q_proj = converted.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(q_proj.qdata, quantize_weight(finalized.model.layers[1].self_attn.q_proj.weight,
                                                      qparams["model.layers.1.self_attn.q_proj"]))
    test_ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), fake_quantized(finalized):
        reference = finalized(input_ids=test_ids).logits
    with torch.no_grad():
        logits = converted(input_ids=test_ids).logits
    span = float(reference.max() - reference.min())
    assert float((logits - reference).abs().max()) <= 1e-4 * span  # torchao's per-token rule is ours, bit for bit
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))
    with torch.no_grad():
        compiled = torch.compile(converted)(input_ids=test_ids).logits
    assert float((compiled - logits).abs().max()) <= 1e-3 * span
