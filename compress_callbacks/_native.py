"""Optional native CPU kernels: a few lines of C compiled on first use with the system C compiler.

Eager PyTorch has no CPU kernel that multiplies float32 by a uint8 mask in place without first
converting the mask to float32 (a temporary, or an extra pass through a buffer). The kernel here
does ``t[i] *= keep[i]`` in one OpenMP-parallel pass (it reads 5 bytes and writes 4 per weight,
where a float32 mask multiply reads 8), so GMP's per-step masking costs less than multiplying by
a 4-byte float mask while its masks stay 1 byte per weight.

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

import torch

__all__ = ["mask_multiply_kernel", "native_enabled"]

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>
/* t[i] *= keep[i] for keep in {0, 1}: one pass, OpenMP across `threads` threads. */
void cc_mul_keep_f32(float *restrict t, const uint8_t *restrict keep, int64_t n, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if(n > 65536 && threads > 1)
    for (int64_t i = 0; i < n; ++i) t[i] *= (float)keep[i];
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
def _load() -> Callable[[torch.Tensor, torch.Tensor], None] | None:
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
    bump = getattr(torch.autograd.graph, "increment_version", None)

    def multiply(tensor: torch.Tensor, keep: torch.Tensor) -> None:
        function(tensor.data_ptr(), keep.data_ptr(), tensor.numel(), torch.get_num_threads())
        if bump is not None:
            bump(tensor)  # an in-place change, as far as autograd's version checks are concerned

    return multiply


def mask_multiply_kernel() -> Callable[[torch.Tensor, torch.Tensor], None] | None:
    """``kernel(t, keep)`` doing ``t *= keep`` in place, or None (disabled or no compiler).

    Only for contiguous float32 CPU ``t`` and a contiguous uint8 ``keep`` of 0/1 with as many
    elements; callers check that (see ``pruning.masks.apply_keep_``).
    """
    if not native_enabled():
        return None
    return _load()
