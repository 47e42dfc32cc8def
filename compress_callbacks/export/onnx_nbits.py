"""Weights of 4 bits and fewer as ONNX Runtime's ``MatMulNBits``: two codes a byte, one scale per block.

A Linear trained with ``weight_bits <= 4`` has codes in ``[-7, 7]``; stored as int8 they take a byte
each. ``MatMulNBits`` (domain ``com.microsoft``, ONNX Runtime's own 4-bit format, what its
``MatMulNBitsQuantizer`` writes) takes them packed, ``code + 8`` per nibble (its default zero point),
``block_size`` consecutive codes along the input dimension sharing a scale. The codes and scales are
the trained ones: per output channel, a row's scale repeats over its blocks (the block is the largest
power of two from 16 to 256 that divides ``in_features``, so a row is usually one or a few blocks); per
group of ``g`` inputs (``weight_group_size``), the block is the group (``g`` a power of two, 16 or more).

>>> import numpy as np
>>> packed, scales, block = pack_nbits(np.array([[-7, 7] * 16]), np.array([0.5], np.float32))
>>> block, packed.shape, hex(packed[0, 0, 0]), scales.tolist()   # 32 codes -> 16 bytes; -7 + 8 low, 7 + 8 high
(32, (1, 1, 16), '0xf1', [0.5])
"""

from __future__ import annotations

import numpy as np

__all__: list[str] = []  # internal to compress_callbacks.export

NBITS = 4
MIN_BLOCK, MAX_BLOCK = 16, 256  # the block lengths ONNX Runtime's MLAS n-bit kernels run fast


def nbits_block_size(in_features: int, group_size: int | None = None) -> int:
    """The ``block_size`` for a weight with ``in_features`` inputs: the group, or for per-channel scales the
    largest power of two in [16, 256] dividing ``in_features`` (16, the last block padded, if none does).

    >>> nbits_block_size(64), nbits_block_size(11008), nbits_block_size(4096), nbits_block_size(40), nbits_block_size(64, 32)
    (64, 256, 256, 16, 32)
    """
    if group_size is not None:
        if group_size < MIN_BLOCK or group_size & (group_size - 1):
            raise ValueError(f"MatMulNBits needs a block of a power of two, {MIN_BLOCK} or more: got a group size of {group_size}")
        return group_size
    block = MAX_BLOCK
    while block > MIN_BLOCK and in_features % block:
        block //= 2
    return block


def pack_nbits(codes: np.ndarray, scale: np.ndarray, group_size: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """``(packed, scales, block_size)`` of ``MatMulNBits`` for weight ``codes`` ``[out, in]`` in [-8, 7].

    ``packed``: uint8 ``[out, ceil(in / block), block / 2]``, codes + 8, the even input in the low
    nibble, the last block padded with code 0; ``scales``: float32 ``[out * blocks]``, from ``scale``
    ``[out]`` (per channel: repeated over the row's blocks) or ``[out, in / group_size]`` (per group).
    """
    codes = np.asarray(codes)
    out_features, in_features = codes.shape
    if codes.min(initial=0) < -(2 ** (NBITS - 1)) or codes.max(initial=0) > 2 ** (NBITS - 1) - 1:
        raise ValueError(f"codes must lie in [-8, 7] to be packed in {NBITS} bits, got [{codes.min()}, {codes.max()}]")
    block = nbits_block_size(in_features, group_size)
    blocks = -(-in_features // block)
    padded = np.zeros((out_features, blocks * block), np.uint8)
    padded[:, :in_features] = codes.astype(np.int16) + 2 ** (NBITS - 1)
    padded[:, in_features:] = 2 ** (NBITS - 1)  # code 0
    packed = (padded[:, 0::2] | (padded[:, 1::2] << NBITS)).astype(np.uint8).reshape(out_features, blocks, block // 2)
    scale = np.asarray(scale, np.float32)
    if group_size is None:
        scales = np.repeat(scale.reshape(out_features, 1), blocks, axis=1)
    else:
        if scale.shape != (out_features, blocks) or in_features % group_size:
            raise ValueError(f"group scales must be [out, in / group_size] = {(out_features, in_features // group_size)}, "
                             f"got {scale.shape}")
        scales = scale
    return packed, np.ascontiguousarray(scales.reshape(-1)), block


def unpack_nbits(packed: np.ndarray, in_features: int) -> np.ndarray:
    """The int8 codes ``[out, in]`` of ``packed`` (the inverse of :func:`pack_nbits`'s packing).

    >>> codes = np.array([[-7, 0, 3, 7] * 8])
    >>> bool((unpack_nbits(pack_nbits(codes, np.ones(1))[0], 32) == codes).all())
    True
    """
    flat = packed.reshape(packed.shape[0], -1)
    nibbles = np.stack([flat & 0xF, flat >> NBITS], axis=-1).reshape(packed.shape[0], -1)
    return (nibbles[:, :in_features].astype(np.int16) - 2 ** (NBITS - 1)).astype(np.int8)


def _matmul_reading(dequantize, readers: dict, grouped: bool):
    """The ``MatMul`` that reads ``dequantize``'s weight through ``Transpose`` (and, for group-wise codes stored
    one row per group, a ``Reshape`` back to ``[out, in]`` first) and nothing else; or None."""
    after = readers.get(dequantize.output[0], [])
    if grouped and len(after) == 1 and after[0].op_type == "Reshape":
        after = readers.get(after[0].output[0], [])
    if len(after) != 1 or after[0].op_type != "Transpose" or len(readers.get(after[0].output[0], [])) != 1:
        return None
    matmul = readers[after[0].output[0]][0]
    return matmul if matmul.op_type == "MatMul" and matmul.input[1] == after[0].output[0] else None


def _pack_low_bit_matmuls(onnx_model, specs_by_codes: dict) -> list[str]:
    """Rewrite ``DequantizeLinear(codes) -> [Reshape] -> Transpose -> MatMul`` as ``MatMulNBits`` for the layers in
    ``specs_by_codes`` (codes initializer name -> spec, each with ``weight_bits <= 4``).

    Returns the codes initializers rewritten. The input's quantization (Q/DQ pair, or the per-token ops of
    a dynamic spec) stays in front of the MatMulNBits, so the activations are what training simulated;
    ``accuracy_level`` is left unset (float compute). Group sizes ``MatMulNBits`` cannot take as its block
    (not a power of two, or under 16) stay int8 codes.
    """
    from onnx import helper, numpy_helper

    from .onnx_passes import _drop_unused

    graph = onnx_model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    packed_names = []
    for dequantize in [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in specs_by_codes]:
        spec = specs_by_codes[dequantize.input[0]]
        group_size = getattr(spec, "weight_group_size", None)
        matmul = _matmul_reading(dequantize, readers, grouped=group_size is not None)
        if matmul is None:
            continue
        codes = numpy_helper.to_array(initializers[dequantize.input[0]]).reshape(spec.weight_scale.shape[0], -1)
        try:
            packed, scales, block = pack_nbits(codes, spec.weight_scale.numpy(), group_size)
        except ValueError:  # a group MatMulNBits has no block for
            continue
        name = dequantize.input[0]
        graph.initializer.extend([numpy_helper.from_array(packed, f"{name}_packed{NBITS}"),
                                  numpy_helper.from_array(scales, f"{name}_block_scales")])
        position = list(graph.node).index(matmul)
        graph.node.remove(matmul)
        graph.node.insert(position, helper.make_node(
            "MatMulNBits", [matmul.input[0], f"{name}_packed{NBITS}", f"{name}_block_scales"], list(matmul.output),
            name=f"{matmul.name or name}_nbits", domain="com.microsoft",
            K=codes.shape[1], N=codes.shape[0], bits=NBITS, block_size=block))
        packed_names.append(name)
    if packed_names and not any(o.domain == "com.microsoft" for o in onnx_model.opset_import):
        onnx_model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _drop_unused(graph)
    return packed_names
