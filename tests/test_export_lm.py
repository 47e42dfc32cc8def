"""ONNX export of Transformers causal LMs (small random Llama / GPT-2) after QAT: dynamic batch and sequence
axes, ONNX Runtime logits against the fake-quant model, the trained codes in the file, clear errors.

Tolerances (stated in docs/export.md), max |ORT - fake-quant| as a fraction of the fake-quant logits' range
(max - min), and top-1 token agreement over the compared positions:

- the file as written (ONNX Runtime with graph optimizations off): 1e-5 (measured 0.0), agreement 1.0;
- ONNX Runtime's int8 kernels (``to_int8``, optimizations on): 1% (measured up to 0.63% over 30 random
  batches: where a layer input lands on a rounding boundary one code moves, and attention carries it to
  the later positions), agreement >= 0.99 (measured 1.0). For scale: fp32 against the fake-quant model
  differs by 0.7% to 6.4% on the same batches, so the exact check is the one that tells them apart.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")  # a test dependency (pyproject [test]); always installed there
onnx = pytest.importorskip("onnx")

from compress_callbacks import CompressionManager, QuantizationAwareTraining  # noqa: E402
from compress_callbacks.export import OnnxRuntimeModule, export_onnx, to_int8  # noqa: E402
from compress_callbacks.export.ort import _calibration_batches, _ort_optimized_graph  # noqa: E402
from compress_callbacks.quantization.ptq import fake_quantized  # noqa: E402
from compress_callbacks.quantization.spec import get_qparams, quantize_weight, set_qparams  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 256
EXACT = 1e-5  # of the fake-quant logits' range: the Q/DQ graph as written
INT8_KERNELS = 1e-2  # ONNX Runtime's fused integer kernels (a code may move at a rounding boundary)
SHAPES = ((2, 16), (3, 7))  # (batch, sequence): two of each, from one exported file


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def tokens(shape, seed):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def qat_finalized(model, steps=4, **qat_kwargs):
    """``model`` trained a few steps with QAT (per-channel weights, int8 inputs), finalized, in eval."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    manager = CompressionManager(QuantizationAwareTraining(start_step=1, **qat_kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's tied lm_head is skipped, with a warning
        manager.attach(model, optimizer)
    for step in range(steps):
        ids = tokens((4, 16), seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return manager.finalize(model).eval()


def right_padded_mask(shape):
    mask = torch.ones(shape, dtype=torch.long)
    mask[-1, shape[1] // 2:] = 0  # the last sequence is shorter
    return mask


def fake_quant_logits(model, ids, mask=None):
    with torch.no_grad(), fake_quantized(model):
        return model(ids, mask, use_cache=False).logits


def assert_matches(logits, reference, tolerance, mask=None):
    """Max error within ``tolerance`` of the reference's range and top-1 agreement (1.0 when exact, else
    >= 0.99) over the positions ``mask`` keeps (the padding of a right-padded sequence is not compared)."""
    keep = torch.ones(reference.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    logits, reference = logits[keep], reference[keep]
    error = float((logits - reference).abs().max() / (reference.max() - reference.min()))
    assert error <= tolerance, error
    agreement = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
    assert agreement >= (1.0 if tolerance <= EXACT else 0.99), agreement


def unoptimized_session(onnx_bytes):
    """The graph exactly as written: ONNX Runtime with graph optimizations (and so its int8 fusions) off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    return lambda *inputs: torch.from_numpy(session.run(None, {f"input_{i}": t.numpy() for i, t in enumerate(inputs)})[0])


@pytest.fixture(scope="module")
def llama():
    return qat_finalized(tiny_llama())


@pytest.fixture(scope="module")
def llama_file(llama, tmp_path_factory):
    ids = tokens((1, 5), seed=10)
    return export_onnx(llama, example_inputs=(ids, torch.ones_like(ids)), path=tmp_path_factory.mktemp("lm") / "llama.onnx")


def graph_dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


# ----------------------------------------------------------------------------------- the file
def test_llama_file_has_dynamic_batch_and_sequence_axes(llama_file):
    graph = onnx.load(llama_file).graph
    assert [(i.name, graph_dims(i)) for i in graph.input] == [("input_0", ["batch", "sequence"]),
                                                              ("input_1", ["batch", "sequence"])]
    assert [(o.name, graph_dims(o)) for o in graph.output] == [("output_0", ["batch", "sequence", VOCAB])]


def test_onnx_runtime_logits_match_the_fake_quant_model_at_two_shapes_from_one_file(llama, llama_file):
    """The file as written; ONNX Runtime's int8 kernels are checked through ``to_int8`` below, which picks
    the weight dtype this CPU runs without saturation (int8 codes on a CPU without VNNI may saturate)."""
    as_written = unoptimized_session(onnx.load(llama_file).SerializeToString())
    for number, shape in enumerate(SHAPES):
        ids, mask = tokens(shape, seed=20 + number), right_padded_mask(shape)
        logits = as_written(ids, mask)
        assert logits.shape == (*shape, VOCAB)
        assert_matches(logits, fake_quant_logits(llama, ids, mask), EXACT, mask)


def test_q_dq_weights_and_input_ranges_in_the_file_are_the_trained_ones(llama, llama_file):
    from onnx import numpy_helper

    graph = onnx.load(llama_file).graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    specs = get_qparams(llama)
    assert len(specs) == 15  # 7 projections per layer and the lm_head
    for name, spec in specs.items():
        [dequantize] = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith(f"{name}.codes")]
        codes = initializers[dequantize.input[0]]
        assert codes.dtype == np.int8
        assert np.array_equal(codes, quantize_weight(llama.get_submodule(name).weight.detach(), spec).numpy())
        assert np.array_equal(initializers[dequantize.input[1]], spec.weight_scale.numpy())
        assert not initializers[dequantize.input[2]].any()
        [transpose] = readers[dequantize.output[0]]
        [matmul] = readers[transpose.output[0]]
        input_dequantize = producer[matmul.input[0]]
        assert input_dequantize.op_type == "DequantizeLinear" and producer[input_dequantize.input[0]].op_type == "QuantizeLinear"
        assert float(initializers[input_dequantize.input[1]]) == pytest.approx(spec.input_scale, rel=1e-7)
        assert int(initializers[input_dequantize.input[2]]) == spec.input_zero_point


# ----------------------------------------------------------------------------------- to_int8
@pytest.fixture(scope="module")
def llama_int8(llama):
    # input_ids alone (aten::diff before), size-1 axes; uint8 weight codes (the choice on CPUs without VNNI)
    return to_int8(llama, example_inputs=tokens((1, 1), seed=30), weight_dtype="uint8")


def test_to_int8_llama_from_input_ids_alone_matches_the_fake_quant_model_at_two_shapes(llama, llama_int8):
    for number, shape in enumerate(SHAPES):
        ids = tokens(shape, seed=40 + number)
        output = llama_int8(ids)
        assert isinstance(output, transformers.modeling_outputs.CausalLMOutputWithPast)  # the model's own structure
        reference = fake_quant_logits(llama, ids)
        assert_matches(output.logits, reference, INT8_KERNELS)
        assert_matches(unoptimized_session(llama_int8.onnx_model)(ids), reference, EXACT)


def test_to_int8_llama_runs_every_quantized_layer_as_an_integer_matmul(llama, llama_int8):
    onnx_model = onnx.load_from_string(llama_int8.onnx_model)
    uint8 = {i.name for i in onnx_model.graph.initializer if i.data_type == onnx.TensorProto.UINT8 and len(i.dims) == 2}
    assert len(uint8) == len(get_qparams(llama))
    optimized = _ort_optimized_graph(onnx_model)
    assert sum(node.op_type == "MatMulIntegerToFloat" for node in optimized.node) == len(get_qparams(llama))


def test_uint8_weight_codes_compute_the_same(llama, llama_file):
    from compress_callbacks.export.onnx_passes import _uint8_weight_codes

    onnx_model = onnx.load(llama_file)
    _uint8_weight_codes(onnx_model)
    initializers = {i.name: i for i in onnx_model.graph.initializer}
    weights = [initializers[n.input[0]] for n in onnx_model.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in initializers]
    assert len(weights) == len(get_qparams(llama))
    assert all(w.data_type == onnx.TensorProto.UINT8 and len(w.dims) == 2 for w in weights)
    ids = tokens(SHAPES[1], seed=50)
    mask = torch.ones_like(ids)
    assert_matches(unoptimized_session(onnx_model.SerializeToString())(ids, mask), fake_quant_logits(llama, ids, mask), EXACT)


def test_gpt2_lm_head_model_conv1d_exports_with_dynamic_axes_and_matches():
    gpt2 = qat_finalized(tiny_gpt2())
    assert all(spec.weight_axis == 1 for spec in get_qparams(gpt2).values())  # Conv1D projections
    int8_model = to_int8(gpt2, example_inputs=tokens((1, 4), seed=60))
    for number, shape in enumerate(SHAPES):
        ids = tokens(shape, seed=61 + number)
        reference = fake_quant_logits(gpt2, ids)
        assert_matches(int8_model(ids).logits, reference, INT8_KERNELS)
        assert_matches(unoptimized_session(int8_model.onnx_model)(ids), reference, EXACT)


# ----------------------------------------------------------------------------------- errors
class Logits(nn.Module):
    """A causal LM inside a wrapper: not a PreTrainedModel, so the TorchScript exporter takes it."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):  # no attention_mask: Transformers looks for packed sequences with aten::diff
        return self.lm(input_ids=ids, use_cache=False).logits


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_a_wrapped_lm_the_torchscript_exporter_cannot_export_raises_one_clear_error_without_its_ir(llama, capfd, tmp_path):
    wrapped = Logits(llama)
    set_qparams(wrapped, {f"lm.{name}": spec for name, spec in get_qparams(llama).items()})
    capfd.readouterr()
    with pytest.raises(RuntimeError, match=r"aten::diff.*PreTrainedModel itself"):
        export_onnx(wrapped, example_inputs=tokens((2, 5), seed=70), path=tmp_path / "wrapped.onnx")
    printed = capfd.readouterr().out
    assert "graph(" not in printed and "Torch IR" not in printed, printed[:500]
    assert not (tmp_path / "wrapped.onnx").exists()


@pytest.mark.parametrize("example", [
    lambda: torch.randn(2, 5),  # not token ids
    lambda: tokens((2, 5, 3), seed=0),  # not [batch, sequence]
    lambda: (tokens((2, 5), seed=0), torch.ones(2, 4, dtype=torch.long)),  # mask of another shape
    lambda: (tokens((2, 5), seed=0),) * 3,  # a third input
])
def test_example_inputs_that_are_not_input_ids_and_a_mask_are_refused_before_export(llama, example, tmp_path):
    with pytest.raises(ValueError, match="`example_inputs` of a Transformers model"):
        export_onnx(llama, example_inputs=example(), path=tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="`example_inputs` of a Transformers model"):
        to_int8(llama, example_inputs=example())
    assert not (tmp_path / "m.onnx").exists()


def test_calibration_batches_of_a_language_model_may_differ_in_batch_and_sequence_only():
    example = (tokens((1, 8), seed=0),)
    assert len(_calibration_batches([tokens((3, 5), seed=1), tokens((2, 9), seed=2)], example, free_dims=2)) == 2
    with pytest.raises(ValueError, match=r"only the batch size and the sequence length may differ"):
        _calibration_batches([tokens((3, 5, 2), seed=1)], example, free_dims=2)
    with pytest.raises(ValueError, match=r"only the batch size may differ"):
        _calibration_batches([tokens((3, 5), seed=1)], example)


# ----------------------------------------------------------------------------------- 4-bit weights, packed
@pytest.fixture(scope="module")
def llama_4bit_file(tmp_path_factory):
    linears = [name for name, module in tiny_llama().named_modules() if isinstance(module, torch.nn.Linear)]
    llama = qat_finalized(tiny_llama(), weight_bits=4, modules=linears)  # the head named: 4 bits too (else kept at 8)
    ids = tokens((2, 6), seed=80)
    return llama, export_onnx(llama, example_inputs=(ids, torch.ones_like(ids)), path=tmp_path_factory.mktemp("lm4") / "llama4.onnx")


def quantized_weight_bytes(onnx_model):
    """Bytes of the quantized layers' weights: their codes (int8 or packed) and weight scales."""
    from onnx import numpy_helper

    initializers = {init.name: numpy_helper.to_array(init) for init in onnx_model.graph.initializer}
    used = set()
    for node in onnx_model.graph.node:
        if node.op_type == "MatMulNBits":
            used.update(node.input[1:3])
        elif node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            used.update(node.input[:2])
    return sum(initializers[name].nbytes for name in used)


def test_4bit_llama_weights_are_packed_trained_codes_about_half_the_int8_size(llama_4bit_file, llama_file):
    from onnx import numpy_helper

    from compress_callbacks.export.onnx_nbits import unpack_nbits

    llama, path = llama_4bit_file
    onnx_model = onnx.load(path)
    initializers = {init.name: numpy_helper.to_array(init) for init in onnx_model.graph.initializer}
    nbits = {node.input[1]: node for node in onnx_model.graph.node if node.op_type == "MatMulNBits"}
    specs = get_qparams(llama)
    assert len(nbits) == len(specs) == 15 and all(spec.weight_bits == 4 for spec in specs.values())
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] in initializers for n in onnx_model.graph.node)
    for name, spec in specs.items():
        node = nbits[f"model.{name}.codes_packed4"]
        weight = llama.get_submodule(name).weight.detach()
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert (attributes["K"], attributes["N"], attributes["bits"]) == (weight.shape[1], weight.shape[0], 4)
        codes = unpack_nbits(initializers[node.input[1]], weight.shape[1])
        assert np.array_equal(codes, quantize_weight(weight, spec).numpy())
        assert np.array_equal(initializers[node.input[2]], spec.weight_scale.numpy())  # one block per row here
    ratio = quantized_weight_bytes(onnx_model) / quantized_weight_bytes(onnx.load(llama_file))
    assert ratio <= 0.55, ratio  # codes: half; the per-row scales are the same in both


@pytest.mark.parametrize("exported", ["llama_4bit_file", "llama_8da4w_file"])
def test_4bit_llama_through_onnx_runtime_matches_the_fake_quant_model_at_two_shapes(exported, request):
    """Per-channel 4-bit weights with int8 input ranges, and 8da4w (groups of 32, per-token inputs)."""
    llama, path = request.getfixturevalue(exported)
    onnx_bytes = onnx.load(path).SerializeToString()
    as_written, session = unoptimized_session(onnx_bytes), OnnxRuntimeModule(onnx_bytes)
    for number, shape in enumerate(SHAPES):
        ids, mask = tokens(shape, seed=90 + number), right_padded_mask(shape)
        reference = fake_quant_logits(llama, ids, mask)
        assert_matches(as_written(ids, mask), reference, EXACT, mask)
        assert_matches(session(ids, mask), reference, INT8_KERNELS, mask)


@pytest.mark.parametrize("in_features, group_size", [(64, None), (40, None), (64, 16), (96, 32)])
def test_matmulnbits_packing_computes_codes_times_scales(in_features, group_size):
    """One MatMulNBits node of ``pack_nbits``'s output against ``x @ (codes * scales).T``: one block per row,
    a padded last block (40 inputs, blocks of 16) and group scales (the layout a ``weight_group_size`` uses)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from compress_callbacks.export.onnx_nbits import pack_nbits

    generator = np.random.default_rng(0)
    out_features = 8
    codes = generator.integers(-7, 8, (out_features, in_features))
    groups = 1 if group_size is None else in_features // group_size
    scale = generator.uniform(0.01, 0.1, (out_features, groups)).astype(np.float32)
    packed, scales, block = pack_nbits(codes, scale[:, 0] if group_size is None else scale, group_size)
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft",
                            K=in_features, N=out_features, bits=4, block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, in_features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, out_features])],
                              initializer=[numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    x = generator.standard_normal((3, in_features)).astype(np.float32)
    [y] = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    weight = codes * np.repeat(scale, in_features // groups, axis=1)
    np.testing.assert_allclose(y, x @ weight.T, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- the LLM schemes
def quantized_linears(model):
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


@pytest.fixture(scope="module")
def llama_8da4w_file(tmp_path_factory):
    """A Llama trained with 8da4w (int4 groups of 32, per-token int8 inputs); the head kept at 8 bits by default."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the head kept at 8 bits is announced
        llama = qat_finalized(tiny_llama(), weight_bits=4, weight_group_size=32, activation_scheme="dynamic")
    ids = tokens((2, 6), seed=81)
    path = tmp_path_factory.mktemp("lm8da4w") / "llama.onnx"
    return llama, export_onnx(llama, example_inputs=(ids, torch.ones_like(ids)), path=path)


def test_8da4w_llama_stores_the_trained_group_codes_and_scales_packed_in_matmulnbits(llama_8da4w_file):
    from onnx import numpy_helper

    from compress_callbacks.export.onnx_nbits import unpack_nbits

    llama, path = llama_8da4w_file
    onnx_model = onnx.load(path)
    initializers = {init.name: numpy_helper.to_array(init) for init in onnx_model.graph.initializer}
    nbits = {node.input[1]: node for node in onnx_model.graph.node if node.op_type == "MatMulNBits"}
    specs = get_qparams(llama)
    four_bit = {name: spec for name, spec in specs.items() if spec.weight_bits == 4}
    assert len(four_bit) == len(nbits) == 14 and specs["lm_head"].weight_bits == 8  # every Linear but the head
    assert all(spec.activation_scheme == "dynamic" and spec.weight_group_size == 32 for spec in specs.values())
    for name, spec in four_bit.items():
        node = nbits[f"model.{name}.codes_packed4"]
        weight = llama.get_submodule(name).weight.detach()
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert (attributes["K"], attributes["N"], attributes["block_size"]) == (weight.shape[1], weight.shape[0], 32)
        assert np.array_equal(unpack_nbits(initializers[node.input[1]], weight.shape[1]), quantize_weight(weight, spec).numpy())
        assert np.array_equal(initializers[node.input[2]], spec.weight_scale.numpy().reshape(-1))  # [out, in / 32] row-major
    assert not any(node.op_type == "QuantizeLinear" for node in onnx_model.graph.node)  # no stored input range anywhere
    # a per-token range per distinct layer input (q/k/v read one, gate/up read one: the exporter shares them):
    # 4 per decoder layer, and the head's
    assert sum(node.op_type == "ReduceMax" for node in onnx_model.graph.node) == 4 * 2 + 1


def test_to_int8_of_an_8da4w_llama_matches_the_fake_quant_model(llama_8da4w_file):
    llama, _ = llama_8da4w_file
    int8 = to_int8(llama, example_inputs=tokens((1, 8), seed=0))
    for number, shape in enumerate(SHAPES):
        ids = tokens(shape, seed=97 + number)
        assert_matches(int8(ids).logits, fake_quant_logits(llama, ids), INT8_KERNELS)


def test_a_tied_embedding_and_head_in_4bit_groups_export_and_match(tmp_path):
    """Embedding (weight-only, groups) and the head tied to it (8da4w): the head packed, the embedding gathered from
    its int8 codes (named in a warning: MatMulNBits is for MatMuls), both on the one trained grid."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    llama = transformers.LlamaForCausalLM(config)
    named = [name for name, module in llama.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Embedding))]
    llama = qat_finalized(llama, weight_bits=4, weight_group_size=32, activation_scheme="dynamic", modules=named)
    specs = get_qparams(llama)
    assert specs["lm_head"].tied_to == "model.embed_tokens" and specs["model.embed_tokens"].weight_only
    ids = tokens((2, 6), seed=3)
    with pytest.warns(UserWarning, match=r"1 layer\(s\) of 4 bits or fewer are stored as int8 codes.*embed_tokens"):
        path = export_onnx(llama, example_inputs=ids, path=tmp_path / "tied.onnx")
    onnx_model = onnx.load(path)
    assert "model.lm_head.codes_packed4" in {node.input[1] for node in onnx_model.graph.node if node.op_type == "MatMulNBits"}
    as_written = unoptimized_session(onnx_model.SerializeToString())
    for number, shape in enumerate(SHAPES):
        ids = tokens(shape, seed=60 + number)
        assert_matches(as_written(ids), fake_quant_logits(llama, ids), EXACT)


def test_gpt2_conv1d_8da4w_exports_packed_and_matches(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's tied lm_head is skipped, with a warning
        gpt2 = qat_finalized(tiny_gpt2(), weight_bits=4, weight_group_size=32, activation_scheme="dynamic")
    path = export_onnx(gpt2, example_inputs=tokens((2, 6), seed=4), path=tmp_path / "gpt2.onnx")
    onnx_model = onnx.load(path)
    assert sum(node.op_type == "MatMulNBits" for node in onnx_model.graph.node) == len(get_qparams(gpt2)) == 8
    as_written = unoptimized_session(onnx_model.SerializeToString())
    for number, shape in enumerate(SHAPES):
        ids = tokens(shape, seed=70 + number)
        assert_matches(as_written(ids), fake_quant_logits(gpt2, ids), EXACT)


def test_a_group_matmulnbits_cannot_block_stays_int8_codes_and_says_so(tmp_path):
    """Groups of 8 (under MatMulNBits' smallest block, 16): int8 codes one row per group, still exact."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llama = qat_finalized(tiny_llama(), weight_bits=4, weight_group_size=8, activation_bits=None)
    ids = tokens((2, 6), seed=5)
    with pytest.warns(UserWarning, match=r"14 layer\(s\) of 4 bits or fewer are stored as int8 codes"):
        path = export_onnx(llama, example_inputs=ids, path=tmp_path / "g8.onnx")
    onnx_model = onnx.load(path)
    assert not any(node.op_type == "MatMulNBits" for node in onnx_model.graph.node)
    assert_matches(unoptimized_session(onnx_model.SerializeToString())(ids), fake_quant_logits(llama, ids), EXACT)


@pytest.mark.parametrize("scheme", [
    dict(weight_bits=4, weight_group_size=16, activation_scheme="dynamic"),
    dict(weight_bits=4, weight_group_size=16, activation_bits=None),
    dict(weight_bits=8, activation_scheme="dynamic"),
])
@pytest.mark.parametrize("backend", ["onnxruntime", "inductor"])
def test_an_mlp_trained_with_the_llm_schemes_converts_on_both_backends(scheme, backend):
    """The TorchScript path (a plain module) and Inductor: group rows and per-token inputs as trained."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    optimizer = torch.optim.AdamW(mlp.parameters(), lr=1e-3)
    manager = CompressionManager(QuantizationAwareTraining(start_step=0, **scheme))
    manager.attach(mlp, optimizer)
    for _ in range(3):
        mlp(torch.randn(8, 32)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    mlp = manager.finalize(mlp).eval()
    x = torch.randn(5, 32) * 3
    with torch.no_grad(), fake_quantized(mlp):
        reference = mlp(x)
    int8 = to_int8(mlp, example_inputs=x[:2], backend=backend)
    error = float((int8(x) - reference).abs().max() / (reference.max() - reference.min()))
    assert error <= EXACT, error