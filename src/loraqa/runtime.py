"""Process settings that make PyTorch on a CPU faster, applied once by the entry points.

glibc serves each block of 128 KiB or more with its own ``mmap`` and hands it back to the OS on
``free``; the next tensor of that size is mapped again and the kernel zero-fills every 4 KiB page
on first touch. Batched prefill and training allocate and free such activations at every layer;
on the 2-core CPU this project measures on, keeping freed memory made evaluation on GPT-2 shapes
~12% faster. Raising the mmap threshold to its documented ceiling (32 MiB on 64-bit glibc) and
never trimming the heap keeps freed memory in the process for the next tensor; peak RSS is
unchanged, RSS just does not fall back after a peak.

glibc's heap fragments under gradient checkpointing, where a step's live tensors are few: on
SmolLM2-135M it held 500-800 MB of free chunks it did not reuse (``mallinfo2``), and they, not the
activations, set the peak (not the optimizer's gradients, LoRA's dropout masks, malloc arenas, nor
the settings above; trimming after every step did not help; giving activation-sized blocks their
own ``mmap`` did, at ~1.7x the time, every mapped page zero-filled on first touch). jemalloc
(``LD_PRELOAD``, as PyTorch's ``torch.backends.xeon.run_cpu --enable-jemalloc`` sets it) reuses
that memory at about the same speed (docs/memory.md), so the ``loraqa`` command runs itself again
under jemalloc where the system has it (``run_under_jemalloc``; ``LORAQA_ALLOCATOR=glibc`` keeps
glibc); ``allocator`` says which one the process runs on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
_applied = False


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse; True when it accepted (Linux glibc only)."""
    global _applied
    if _applied or not sys.platform.startswith("linux"):
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied


def allocator() -> str:
    """The malloc this process runs on: "jemalloc" or "tcmalloc" when loaded (``LD_PRELOAD``),
    "glibc" on other Linux processes, "system" elsewhere."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name in ("jemalloc", "tcmalloc"):
        if f"lib{name}" in maps:
            return name
    return "glibc" if sys.platform.startswith("linux") and "libc.so" in maps else "system"


def run_under_jemalloc(command: list[str]) -> None:
    """Replace this process by ``command`` under jemalloc when this is a glibc process and the
    system has jemalloc (Debian/Ubuntu: ``apt-get install libjemalloc2``); otherwise return.
    ``LORAQA_ALLOCATOR`` set (to ``glibc``, or by the replaced process itself) leaves the process as it is."""
    if os.environ.get("LORAQA_ALLOCATOR") or allocator() != "glibc":
        return
    library = ctypes.util.find_library("jemalloc")  # its soname, e.g. libjemalloc.so.2, as ldconfig knows it
    if library is None:
        return
    preload = " ".join(filter(None, [os.environ.get("LD_PRELOAD"), library]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, {**os.environ, "LD_PRELOAD": preload, "LORAQA_ALLOCATOR": "jemalloc"})
