"""Process settings that make PyTorch on a CPU faster, applied once by the entry points.

glibc serves each block of 128 KiB or more with its own ``mmap`` and hands it back to the OS on
``free``; the next tensor of that size is mapped again and the kernel zero-fills every 4 KiB page
on first touch. Batched prefill and training allocate and free such activations at every layer;
on the 2-core CPU this project measures on, keeping freed memory made evaluation on GPT-2 shapes
~12% faster. Raising the mmap threshold to its documented ceiling (32 MiB on 64-bit glibc) and
never trimming the heap keeps freed memory in the process for the next tensor; peak RSS is
unchanged, RSS just does not fall back after a peak.

Kept that way, the heap fragments: under gradient checkpointing, where a step's live tensors are
few (~300 MB of activations on SmolLM2-135M), glibc's heap held 500-800 MB of free chunks it did
not reuse after 20 steps, and they, not the activations, set the peak (``mallinfo2``; neither the
optimizer's gradients, nor LoRA's dropout masks, nor malloc arenas were the cause, and trimming the
heap after every step did not help). Training under checkpointing, the mode that trades time for
memory, runs in ``bounded_heap``: blocks of 2 MiB or more get their own ``mmap`` again, so a freed
activation goes back to the OS. 1 MiB bounded the peak further but cost ~15% more time (every
mapped page is zero-filled when first touched).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
MMAP_THRESHOLD_DEFAULT = 128 << 10  # glibc's starting threshold
BOUNDED_MMAP_THRESHOLD = 2 << 20
_applied = False
_libc = None


def _glibc():
    """glibc's handle, or None on other platforms and libcs."""
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _libc = False
    return _libc or None


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse; True when it accepted (Linux glibc only)."""
    global _applied
    if _applied or not sys.platform.startswith("linux"):
        return _applied
    try:
        mallopt = _glibc().mallopt
    except AttributeError:  # no libc handle, or musl and other libcs without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied


@contextlib.contextmanager
def bounded_heap(enabled: bool = True):
    """Within: blocks of ``BOUNDED_MMAP_THRESHOLD`` bytes or more are mapped on their own (given
    back on free); after: the threshold this module set before (glibc only; elsewhere a no-op).
    """
    mallopt = getattr(_glibc(), "mallopt", None) if enabled else None
    if mallopt is None:
        yield
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mallopt(M_MMAP_THRESHOLD, BOUNDED_MMAP_THRESHOLD)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX if _applied else MMAP_THRESHOLD_DEFAULT)
