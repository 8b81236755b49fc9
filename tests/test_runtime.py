import ctypes.util
import os
import platform
import subprocess
import sys

import pytest

from loraqa.runtime import allocator, keep_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_allocator_settings():
    assert keep_freed_memory() is True  # False if glibc rejected either setting
    assert keep_freed_memory() is True  # applying twice is harmless


JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc process")
def test_allocator_names_the_malloc_in_use():
    assert allocator() == "glibc"
    if not os.path.exists(JEMALLOC):
        pytest.skip(f"{JEMALLOC} not installed (apt-get install libjemalloc2)")
    out = subprocess.run([sys.executable, "-c", "from loraqa.runtime import allocator; print(allocator())"],
                         env={**os.environ, "LD_PRELOAD": JEMALLOC}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "jemalloc"


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc process")
def test_the_command_runs_itself_again_under_jemalloc_unless_told_not_to():
    if ctypes.util.find_library("jemalloc") is None:
        pytest.skip("jemalloc not installed (apt-get install libjemalloc2)")
    child = "from loraqa.runtime import allocator; print('replaced', allocator())"
    code = (f"import sys; from loraqa.runtime import allocator, run_under_jemalloc; "
            f"run_under_jemalloc([sys.executable, '-c', {child!r}]); print('kept', allocator())")
    env = {k: v for k, v in os.environ.items() if k not in ("LORAQA_ALLOCATOR", "LD_PRELOAD")}
    for setting, expected in ((None, "replaced jemalloc"), ("glibc", "kept glibc")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env=env if setting is None else {**env, "LORAQA_ALLOCATOR": setting})
        assert out.stdout.strip() == expected
