"""Process settings that make PyTorch on a CPU faster or leaner, applied once by the entry points,
and the process's peak memory.

- glibc's malloc is asked to keep freed memory (a higher mmap threshold, no trimming), so the next
  activation of the same size is not mapped and zero-filled again.
- The ``loraqa`` command runs itself again under jemalloc where the system has it: glibc's heap
  fragments under gradient checkpointing and sets the peak; jemalloc reuses that memory
  (``LORAQA_ALLOCATOR=glibc`` keeps glibc).

What was measured: docs/design-notes.md and docs/memory.md.
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


def peak_memory_mb(device) -> float:
    """Peak allocated GPU memory on CUDA (``device``, a torch.device); else the process's peak
    resident set size. torch is imported here, so that commands that need none start without it."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
