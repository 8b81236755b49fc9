import platform

import pytest

from loraqa.runtime import keep_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_allocator_settings():
    assert keep_freed_memory() is True  # False if glibc rejected either setting
    assert keep_freed_memory() is True  # applying twice is harmless
