"""Optional native CPU kernels: a few lines of C compiled on first use with the system C compiler.

Per-step passes that eager PyTorch can only do in several:

* ``t *= keep`` with a uint8 mask: PyTorch first converts the mask to float32 (a temporary, or an
  extra pass through a buffer). Here it is one OpenMP-parallel pass reading 5 bytes and writing 4
  per weight, where a float32 mask multiply reads 8: GMP's masking then costs less than a 4-byte
  float mask while its masks stay 1 byte per weight.
* the weight fake-quant ``round(w / s) * s`` per output channel: three passes
  (``mul``, ``round_``, ``mul_``) become one, with bit-identical float32 results;
* the activation fake-quant ``clamp(round(x / s), lo, hi) * s`` and its straight-through mask:
  five passes and three temporaries become one pass (and one for the backward).

Nothing here is required. The kernel is built with ``$CC`` (else ``cc`` or ``gcc``) and
``-O3 -fopenmp`` into ``~/.cache/compress_callbacks`` (``$COMPRESS_CALLBACKS_CACHE`` overrides),
once per machine and source version (about 0.2 s), written atomically and loaded with ``ctypes``.
No torch headers, no ninja, no lock files. Without a working compiler, or with
``COMPRESS_CALLBACKS_NATIVE=0``, :func:`mask_multiply_kernel` returns None and callers use the
pure-PyTorch path, which gives the same results.

>>> import torch
>>> kernel = mask_multiply_kernel()
>>> t, keep = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 0, 1], dtype=torch.uint8)
>>> _ = kernel(t, keep) if kernel is not None else t.mul_(keep)
>>> t.tolist()
[1.0, 0.0, 3.0]
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = ["activation_kernels", "fake_quantize_rows_kernel", "magnitude_select_kernels", "mask_multiply_kernel",
           "native_enabled"]

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <math.h>
#include <omp.h>
#include <stdint.h>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* vectorised for AVX-512 and AVX2 too, picked at load time by the CPU (one portable library) */
#define CC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CC_CLONES
#endif
/* t[i] *= keep[i] for keep in {0, 1}: one pass, OpenMP across `threads` threads. */
CC_CLONES void cc_mul_keep_f32(float *restrict t, const uint8_t *restrict keep, int64_t n, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if(n > 65536 && threads > 1)
    for (int64_t i = 0; i < n; ++i) t[i] *= (float)keep[i];
}
/* out = round_half_even(w * (1 / s_row)) * s_row, row by row: what torch computes with
   (w * s.reciprocal()).round_().mul_(s), in one pass. |w * (1 / s)| <= 2^22 (s comes from max |w|),
   where (|y| + 1.5 * 2^23) - 1.5 * 2^23 is round-half-even in IEEE float (no -ffast-math here), and
   copysignf keeps torch.round's sign of zero. */
CC_CLONES void cc_fake_quant_rows_f32(const float *restrict w, float *restrict out, const float *restrict scale,
                            int64_t rows, int64_t cols, int threads) {
    const float magic = 12582912.0f;
    #pragma omp parallel for num_threads(threads) schedule(static) if(rows * cols > 65536 && threads > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const float s = scale[r], inv = 1.0f / s;
        const float *src = w + r * cols;
        float *dst = out + r * cols;
        for (int64_t c = 0; c < cols; ++c) {
            const float y = src[c] * inv;
            dst[c] = copysignf((fabsf(y) + magic) - magic, y) * s;
        }
    }
}
/* Per-tensor activation fake-quant: r = round_half_even(x * inv), c = clamp(r, lo, hi),
   out = c * scale, inside = (c == r) (where the straight-through gradient passes). Same values as
   torch's (x * inv).round_(), clamp, mul_, also for NaN and inf (compares, not fminf/fmaxf). Past
   2^22 the rounding trick is inexact, but such values are clamped either way. */
CC_CLONES void cc_fake_quant_act_f32(const float *restrict x, float *restrict out, uint8_t *restrict inside,
                                     int64_t n, float scale, float inv, float lo, float hi, int threads) {
    const float magic = 12582912.0f;
    #pragma omp parallel for num_threads(threads) schedule(static) if(n > 65536 && threads > 1)
    for (int64_t i = 0; i < n; ++i) {
        const float y = x[i] * inv;
        const float r = copysignf((fabsf(y) + magic) - magic, y);
        const float c = r < lo ? lo : (r > hi ? hi : r);
        out[i] = c * scale;
        inside[i] = (uint8_t)(c == r);
    }
}
/* out = keep ? g : 0 (torch.where(keep, g, 0.0)), a new tensor. */
CC_CLONES void cc_where_keep_f32(const float *restrict g, const uint8_t *restrict keep, float *restrict out,
                                 int64_t n, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if(n > 65536 && threads > 1)
    for (int64_t i = 0; i < n; ++i) out[i] = keep[i] ? g[i] : 0.0f;
}
/* Magnitude keys without materialising them: key = bits(|w|) (0x7fffffff & bits, so -0.0 -> 0 and
   NaN above inf, as torch's abs_().view(int32)), or INT32_MAX where keep == 0 (keep may be NULL).
   hist[(key >> shift) & mask] += 1 over keys with key >> prefix_shift == prefix (prefix < 0: all). */
static inline int32_t cc_key(const float *w, const uint8_t *keep, int64_t i) {
    union { float f; int32_t b; } u;
    u.f = w[i];
    return (keep && !keep[i]) ? 0x7fffffff : (u.b & 0x7fffffff);
}
void cc_key_histogram_f32(const float *restrict w, const uint8_t *restrict keep, int64_t n, int shift, int bits,
                          int64_t prefix, int prefix_shift, int64_t *restrict hist, int threads) {
    const int32_t low = (int32_t)((1u << bits) - 1);
    const int64_t size = (int64_t)1 << bits;
    #pragma omp parallel num_threads(threads) if(n > 65536 && threads > 1)
    {
        /* four interleaved copies: runs of equal digits (common: similar magnitudes) do not serialise
           on one counter */
        int64_t local[4][1 << 11]; /* bits <= 11 */
        for (int c = 0; c < 4; ++c)
            for (int64_t b = 0; b < size; ++b) local[c][b] = 0;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < n; ++i) {
            int32_t key = cc_key(w, keep, i);
            if (prefix < 0 || (int64_t)(key >> prefix_shift) == prefix) local[i & 3][(key >> shift) & low] += 1;
        }
        #pragma omp critical
        for (int64_t b = 0; b < size; ++b) hist[b] += local[0][b] + local[1][b] + local[2][b] + local[3][b];
    }
}
/* The keep mask after pruning every key below `threshold` and the first `ties` keys equal to it in
   index order: out[i] = 0 there, else keep[i] (1 where keep is NULL). Returns the ties taken.
   Parallel: each thread marks its range (equal keys as 2), counts its equal keys, then after a
   barrier resolves them knowing how many equal keys come before its range. */
int64_t cc_prune_below_f32(const float *restrict w, const uint8_t *restrict keep, int64_t n, int32_t threshold,
                           int64_t ties, uint8_t *restrict out, int threads) {
    if (threads < 1 || n <= 65536) threads = 1;
    int64_t equal[threads];
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), team = omp_get_num_threads();
        int64_t lo = n * t / team, hi = n * (t + 1) / team, count = 0;
        for (int64_t i = lo; i < hi; ++i) {
            int32_t key = cc_key(w, keep, i);
            uint8_t kept = keep ? keep[i] : 1;
            out[i] = key < threshold ? 0 : (key == threshold ? 2 : kept);
            count += key == threshold;
        }
        equal[t] = count;
        #pragma omp barrier
        int64_t before = 0;
        for (int u = 0; u < t; ++u) before += equal[u];
        int64_t left = ties - before; /* equal keys of this range still to prune, in index order */
        if (count > 0) {
            for (int64_t i = lo; i < hi; ++i) {
                if (out[i] != 2) continue;
                if (left > 0) { out[i] = 0; --left; }
                else out[i] = keep ? keep[i] : 1; /* kept: equal keys are never already-pruned ones */
            }
        }
    }
    int64_t total = 0;
    for (int u = 0; u < threads; ++u) total += equal[u];
    return total < ties ? total : ties;
}
"""
_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")


def native_enabled() -> bool:
    """False when ``COMPRESS_CALLBACKS_NATIVE`` is set to ``0`` / ``false`` / ``no``."""
    return os.environ.get("COMPRESS_CALLBACKS_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    configured = os.environ.get("COMPRESS_CALLBACKS_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "compress_callbacks"


def _build(compiler: list[str]) -> Path:
    key = hashlib.sha256("\0".join((_SOURCE, *compiler, *_FLAGS, platform.machine())).encode()).hexdigest()[:16]
    folder = _cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir()) / f"compress_callbacks_{os.getuid() if hasattr(os, 'getuid') else 0}"
        folder.mkdir(parents=True, exist_ok=True)
    library = folder / f"masks_{key}.so"
    if library.exists():
        return library
    with tempfile.TemporaryDirectory(dir=folder) as work:
        source = Path(work) / "masks.c"
        source.write_text(_SOURCE)
        built = Path(work) / library.name
        subprocess.run([*compiler, *_FLAGS, str(source), "-o", str(built)], check=True, capture_output=True, timeout=120)
        os.replace(built, library)  # atomic: concurrent builders (DDP ranks) each write a whole file
    return library


@functools.lru_cache(maxsize=None)
def _load() -> _Kernels | None:
    if platform.system() == "Windows":
        return None
    compiler = shlex.split(os.environ.get("CC", "")) or [c for c in (shutil.which("cc") or shutil.which("gcc"),) if c]
    if not compiler:
        logger.info("compress_callbacks: no C compiler found; masks use the pure-PyTorch path")
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
        function = library.cc_mul_keep_f32
    except (OSError, subprocess.SubprocessError, AttributeError) as error:
        detail = getattr(error, "stderr", b"") or b""
        logger.info("compress_callbacks: native mask kernel unavailable (%s %s); using the pure-PyTorch path",
                    type(error).__name__, detail.decode(errors="replace")[-300:])
        return None
    function.restype = None
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    quantize = library.cc_fake_quant_rows_f32
    quantize.restype = None
    quantize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    activation = library.cc_fake_quant_act_f32
    activation.restype = None
    activation.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                           ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_int]
    where_keep = library.cc_where_keep_f32
    where_keep.restype = None
    where_keep.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    histogram = library.cc_key_histogram_f32
    histogram.restype = None
    histogram.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    prune_below = library.cc_prune_below_f32
    prune_below.restype = ctypes.c_int64
    prune_below.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int64,
                            ctypes.c_void_p, ctypes.c_int]
    bump = getattr(torch.autograd.graph, "increment_version", None)

    def multiply(tensor: torch.Tensor, keep: torch.Tensor) -> None:
        function(tensor.data_ptr(), keep.data_ptr(), tensor.numel(), torch.get_num_threads())
        if bump is not None:
            bump(tensor)  # an in-place change, as far as autograd's version checks are concerned

    def fake_quantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(weight, memory_format=torch.contiguous_format)
        rows = weight.shape[0]
        quantize(weight.data_ptr(), out.data_ptr(), scale.data_ptr(), rows, weight.numel() // max(rows, 1),
                 torch.get_num_threads())
        return out

    def fake_quantize_activation(x: torch.Tensor, scale: float, inv: float, lo: float, hi: float):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        inside = torch.empty(x.shape, dtype=torch.uint8)
        activation(x.data_ptr(), out.data_ptr(), inside.data_ptr(), x.numel(), scale, inv, lo, hi, torch.get_num_threads())
        return out, inside

    def masked_gradient(grad: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        out = torch.empty(grad.shape, dtype=torch.float32)
        where_keep(grad.data_ptr(), inside.data_ptr(), out.data_ptr(), grad.numel(), torch.get_num_threads())
        return out

    def key_histogram(weight, keep, shift: int, bits: int, prefix: int | None, prefix_shift: int, hist) -> None:
        if not 1 <= bits <= 11 or hist.numel() != 1 << bits or hist.dtype != torch.int64:
            raise ValueError(f"key_histogram: bits must be 1..11 with an int64 hist of 2**bits bins, got {bits}")
        histogram(weight.data_ptr(), keep.data_ptr() if keep is not None else None, weight.numel(), shift, bits,
                  -1 if prefix is None else prefix, prefix_shift, hist.data_ptr(), torch.get_num_threads())

    def prune_below_key(weight, keep, threshold: int, ties: int):
        out = torch.empty(weight.shape, dtype=torch.uint8)
        taken = prune_below(weight.data_ptr(), keep.data_ptr() if keep is not None else None, weight.numel(),
                            threshold, ties, out.data_ptr(), torch.get_num_threads())
        return out, int(taken)

    return _Kernels(multiply, fake_quantize, fake_quantize_activation, masked_gradient, key_histogram, prune_below_key)


class _Kernels(NamedTuple):
    multiply: Callable
    fake_quantize: Callable
    fake_quantize_activation: Callable
    masked_gradient: Callable
    key_histogram: Callable
    prune_below_key: Callable


def _kernels() -> _Kernels | None:
    """The loaded kernels, or None when disabled (``COMPRESS_CALLBACKS_NATIVE=0``) or unavailable."""
    return _load() if native_enabled() else None


def mask_multiply_kernel() -> Callable[[torch.Tensor, torch.Tensor], None] | None:
    """``kernel(t, keep)`` doing ``t *= keep`` in place, or None (disabled or no compiler).

    Only for contiguous float32 CPU ``t`` and a contiguous uint8 ``keep`` of 0/1 with as many
    elements; callers check that (see ``pruning.masks.apply_keep_``).
    """
    kernels = _kernels()
    return kernels.multiply if kernels is not None else None


def magnitude_select_kernels():
    """``(key_histogram, prune_below_key)`` for radix selection on ``|w|`` without building keys, or None.

    ``key_histogram(w, keep, shift, bits, prefix, prefix_shift, hist)`` adds the digit histogram of the
    magnitude keys (see ``pruning.masks.magnitude_keys``) into the int64 ``hist``;
    ``prune_below_key(w, keep, threshold, ties) -> (new_keep, taken)`` returns the uint8 keep mask with
    every key below ``threshold`` and the first ``ties`` keys equal to it (index order) pruned.
    Contiguous float32 CPU ``w``, contiguous uint8 ``keep`` or None.
    """
    kernels = _kernels()
    return (kernels.key_histogram, kernels.prune_below_key) if kernels is not None else None


def activation_kernels():
    """``(fake_quantize(x, scale, inv, lo, hi) -> (out, inside), masked_gradient(grad, inside))`` or None.

    The per-tensor activation fake-quant in one pass (values equal to the torch ops') and its
    straight-through backward ``where(inside, grad, 0)``. Contiguous float32 CPU tensors only.
    """
    kernels = _kernels()
    return (kernels.fake_quantize_activation, kernels.masked_gradient) if kernels is not None else None


def fake_quantize_rows_kernel() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """``kernel(weight, scale) -> round(w / s) * s`` per row (output channel), or None.

    Same float32 values as ``(w * s.reciprocal()).round_().mul_(s)``, in one pass. Only for a
    contiguous float32 CPU ``weight`` and a contiguous float32 ``scale`` with one value per row.
    """
    kernels = _kernels()
    return kernels.fake_quantize if kernels is not None else None
