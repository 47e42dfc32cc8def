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
once per machine and source version (about 0.2 s), and loaded with ``ctypes``. No torch headers,
no ninja, no lock files. Without a working compiler, or with ``COMPRESS_CALLBACKS_NATIVE=0``,
:func:`mask_multiply_kernel` returns None and callers use the pure-PyTorch path, which gives the
same results; the reason is logged (``logging``, level INFO), never warned.

The cache is trusted only if it is private: the folder is created with mode 0700, and a folder,
a folder above it or a library that another user owns or that group or others may write is
refused (one ``RuntimeWarning``): the library is then built in a fresh private temporary folder
(``tempfile.mkdtemp``), loaded, and that folder removed. A build always happens in a fresh
private folder and is moved into the cache in one atomic rename.

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
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = ["activation_kernels", "c_compiler", "fake_quantize_rows_kernel", "magnitude_select_kernels",
           "mask_multiply_kernel", "native_enabled"]

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
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
    /* one count per thread of the team OpenMP actually starts, which may be smaller than `threads`
       (OMP_DYNAMIC, OMP_THREAD_LIMIT, nesting): sized and summed by that team, zero-initialised */
    int64_t *equal = NULL;
    int team_size = 1;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp single
        {
            team_size = omp_get_num_threads();
            equal = (int64_t *)calloc((size_t)team_size, sizeof(int64_t));
        } /* implicit barrier: every thread sees `equal` */
        if (equal != NULL) {
            int t = omp_get_thread_num(), team = team_size;
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
    }
    if (equal == NULL) return -1; /* out of memory: nothing usable in `out` */
    int64_t total = 0;
    for (int u = 0; u < team_size; ++u) total += equal[u];
    free(equal);
    return total < ties ? total : ties;
}
"""
_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")


def native_enabled() -> bool:
    """False when ``COMPRESS_CALLBACKS_NATIVE`` is set to ``0`` / ``false`` / ``no``."""
    return os.environ.get("COMPRESS_CALLBACKS_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def c_compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` if its program exists, else ``cc`` or ``gcc`` on the PATH; None if none.

    A ``$CC`` naming a program that does not exist counts as no compiler (it is not replaced by
    ``cc``: the user chose it). Whether it builds is only known by trying (see :func:`_load`).
    """
    configured = shlex.split(os.environ.get("CC", ""))
    if configured:
        return configured if shutil.which(configured[0]) else None
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def _cache_dir() -> Path:
    configured = os.environ.get("COMPRESS_CALLBACKS_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "compress_callbacks"


def untrusted(path: Path, folder_above: bool = False) -> str | None:
    """Why ``path`` (followed if a link) could have been written by another user, or None if it could not.

    ``path`` must be owned by this user and not writable by group or others. A folder above the
    cache (``folder_above``) may also be root's, and writable by others if it is sticky (``/tmp``).

    >>> with tempfile.TemporaryDirectory() as folder:   # created with mode 0700
    ...     library = Path(folder, "lib.so")
    ...     library.touch()
    ...     library.chmod(0o666)
    ...     untrusted(Path(folder)), untrusted(library).endswith("writable by group or others (mode 0666)")
    (None, True)
    """
    info = path.stat()
    uid = os.getuid()
    if info.st_uid != uid and not (folder_above and info.st_uid == 0):
        return f"{path} is owned by uid {info.st_uid}, not by this user (uid {uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (folder_above and info.st_mode & stat.S_ISVTX):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def _private_cache(folder: Path) -> str | None:
    """Create ``folder`` (mode 0700) if missing; why it cannot be trusted, or None. OSError if it cannot be made."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    absolute = Path(os.path.abspath(folder))
    for above in dict.fromkeys([*absolute.parents, *absolute.resolve().parents]):
        reason = untrusted(above, folder_above=True)
        if reason is not None:
            return reason
    return untrusted(folder)


def _compile(compiler: list[str], work: Path, name: str) -> Path:
    """Build the library into the private folder ``work``; its path (mode 0700)."""
    source = work / "masks.c"
    source.write_text(_SOURCE)
    built = work / name
    subprocess.run([*compiler, *_FLAGS, str(source), "-o", str(built)], check=True, capture_output=True, timeout=120)
    built.chmod(0o700)  # whatever the umask: group-writable would make the next process refuse it
    return built


def _library_name(compiler: list[str]) -> str:
    """One name per source, compiler command, flags and machine."""
    key = hashlib.sha256("\0".join((_SOURCE, *compiler, *_FLAGS, platform.machine())).encode()).hexdigest()[:16]
    return f"masks_{key}.so"


def _open_library(compiler: list[str]) -> ctypes.CDLL:
    """The cached library (built and cached first if needed), or one built privately if the cache is unusable."""
    name = _library_name(compiler)
    folder = _cache_dir()
    try:
        refused = _private_cache(folder)
    except OSError as error:  # e.g. a read-only home: nothing unsafe, only uncached
        logger.info("compress_callbacks: cache folder %s unavailable (%s); building privately", folder, error)
        refused = ""
    if refused is None:
        library = folder / name
        if library.exists():
            reason = untrusted(library)
            if reason is None:
                return ctypes.CDLL(str(library))
            warnings.warn(f"compress_callbacks: refusing to load the native kernels' library: {reason}; rebuilding it",
                          RuntimeWarning, stacklevel=2)
        try:
            work = Path(tempfile.mkdtemp(dir=folder))  # private (0700), same file system: the rename is atomic
        except OSError as error:  # a cache folder this user may not write: nothing unsafe, only uncached
            logger.info("compress_callbacks: cannot write to %s (%s); building privately", folder, error)
        else:
            try:
                # concurrent builders (DDP ranks) each move a whole file into place
                os.replace(_compile(compiler, work, name), library)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            return ctypes.CDLL(str(library))
    elif refused:
        warnings.warn(f"compress_callbacks: not using the native kernels' cache: {refused}; building them in a "
                      "private temporary folder instead (set COMPRESS_CALLBACKS_CACHE to a folder only you can write)",
                      RuntimeWarning, stacklevel=2)
    work = Path(tempfile.mkdtemp(prefix="compress_callbacks_"))
    try:
        return ctypes.CDLL(str(_compile(compiler, work, name)))  # stays mapped once its file is removed
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _function(library: ctypes.CDLL, name: str, restype, *argtypes):
    function = getattr(library, name)
    function.restype, function.argtypes = restype, list(argtypes)
    return function


class _Library(NamedTuple):
    multiply: Callable
    fake_quantize: Callable
    fake_quantize_activation: Callable
    masked_gradient: Callable
    key_histogram: Callable
    prune_below: Callable


@functools.lru_cache(maxsize=None)
def _load() -> _Library | None:
    """The library's functions, once per process; None (and why, logged at INFO) where it cannot be built."""
    if platform.system() == "Windows":
        return None
    compiler = c_compiler()
    if compiler is None:
        logger.info("compress_callbacks: no C compiler found (CC=%r); using the pure-PyTorch path", os.environ.get("CC"))
        return None
    try:
        library = _open_library(compiler)
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        return _Library(
            _function(library, "cc_mul_keep_f32", None, p, p, i64, i32),
            _function(library, "cc_fake_quant_rows_f32", None, p, p, p, i64, i64, i32),
            _function(library, "cc_fake_quant_act_f32", None, p, p, p, i64, f32, f32, f32, f32, i32),
            _function(library, "cc_where_keep_f32", None, p, p, p, i64, i32),
            _function(library, "cc_key_histogram_f32", None, p, p, i64, i32, i32, i64, i32, p, i32),
            _function(library, "cc_prune_below_f32", i64, p, p, i64, ctypes.c_int32, i64, p, i32),
        )
    except (OSError, subprocess.SubprocessError, AttributeError) as error:
        detail = getattr(error, "stderr", b"") or b""
        logger.info("compress_callbacks: native kernels unavailable (%s: %s %s); using the pure-PyTorch path",
                    type(error).__name__, error, detail.decode(errors="replace")[-300:])
        return None


# The kernels: module-level functions (they pickle and deepcopy by reference), for the tensor
# layouts their getters below describe; each reads the library loaded once by _load().

def multiply_keep_(tensor: torch.Tensor, keep: torch.Tensor) -> None:
    _load().multiply(tensor.data_ptr(), keep.data_ptr(), tensor.numel(), torch.get_num_threads())
    torch.autograd.graph.increment_version(tensor)  # an in-place change, as far as autograd's checks go


def fake_quantize_rows(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    rows = weight.shape[0]
    _load().fake_quantize(weight.data_ptr(), out.data_ptr(), scale.data_ptr(), rows, weight.numel() // max(rows, 1),
                          torch.get_num_threads())
    return out


def fake_quantize_activation(x: torch.Tensor, scale: float, inv: float, lo: float, hi: float):
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    inside = torch.empty(x.shape, dtype=torch.uint8)
    _load().fake_quantize_activation(x.data_ptr(), out.data_ptr(), inside.data_ptr(), x.numel(), scale, inv, lo, hi,
                                     torch.get_num_threads())
    return out, inside


def masked_gradient(grad: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    out = torch.empty(grad.shape, dtype=torch.float32)
    _load().masked_gradient(grad.data_ptr(), inside.data_ptr(), out.data_ptr(), grad.numel(), torch.get_num_threads())
    return out


def key_histogram(weight, keep, shift: int, bits: int, prefix: int | None, prefix_shift: int, hist) -> None:
    if not 1 <= bits <= 11 or hist.numel() != 1 << bits or hist.dtype != torch.int64:
        raise ValueError(f"key_histogram: bits must be 1..11 with an int64 hist of 2**bits bins, got {bits}")
    _load().key_histogram(weight.data_ptr(), keep.data_ptr() if keep is not None else None, weight.numel(), shift,
                          bits, -1 if prefix is None else prefix, prefix_shift, hist.data_ptr(), torch.get_num_threads())


def prune_below_key(weight, keep, threshold: int, ties: int):
    out = torch.empty(weight.shape, dtype=torch.uint8)
    taken = _load().prune_below(weight.data_ptr(), keep.data_ptr() if keep is not None else None, weight.numel(),
                                threshold, ties, out.data_ptr(), torch.get_num_threads())
    if taken < 0:
        raise MemoryError("prune_below_key: the native kernel could not allocate its per-thread counts")
    return out, int(taken)


def _available() -> bool:
    """Whether the kernels may run: enabled (``COMPRESS_CALLBACKS_NATIVE``) and built."""
    return native_enabled() and _load() is not None


def mask_multiply_kernel() -> Callable[[torch.Tensor, torch.Tensor], None] | None:
    """``kernel(t, keep)`` doing ``t *= keep`` in place, or None (disabled or no compiler).

    Only for contiguous float32 CPU ``t`` and a contiguous uint8 ``keep`` of 0/1 with as many
    elements; callers check that (see ``pruning.masks.apply_keep_``).
    """
    return multiply_keep_ if _available() else None


def magnitude_select_kernels():
    """``(key_histogram, prune_below_key)`` for radix selection on ``|w|`` without building keys, or None.

    ``key_histogram(w, keep, shift, bits, prefix, prefix_shift, hist)`` adds the digit histogram of the
    magnitude keys (see ``pruning.masks.magnitude_keys``) into the int64 ``hist``;
    ``prune_below_key(w, keep, threshold, ties) -> (new_keep, taken)`` returns the uint8 keep mask with
    every key below ``threshold`` and the first ``ties`` keys equal to it (index order) pruned.
    Contiguous float32 CPU ``w``, contiguous uint8 ``keep`` or None.
    """
    return (key_histogram, prune_below_key) if _available() else None


def activation_kernels():
    """``(fake_quantize(x, scale, inv, lo, hi) -> (out, inside), masked_gradient(grad, inside))`` or None.

    The per-tensor activation fake-quant in one pass (values equal to the torch ops') and its
    straight-through backward ``where(inside, grad, 0)``. Contiguous float32 CPU tensors only.
    """
    return (fake_quantize_activation, masked_gradient) if _available() else None


def fake_quantize_rows_kernel() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """``kernel(weight, scale) -> round(w / s) * s`` per row (output channel), or None.

    Same float32 values as ``(w * s.reciprocal()).round_().mul_(s)``, in one pass. Only for a
    contiguous float32 CPU ``weight`` and a contiguous float32 ``scale`` with one value per row.
    """
    return fake_quantize_rows if _available() else None
