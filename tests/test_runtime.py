import platform

import pytest

from loraqa.runtime import keep_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_allocator_settings():
    assert keep_freed_memory() is True  # False if glibc rejected either setting
    assert keep_freed_memory() is True  # applying twice is harmless


def _mapped_bytes_after_malloc(size: int) -> int:
    """Bytes glibc holds in blocks mapped on their own while a ``size``-byte block is allocated."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("mallinfo2 needs glibc 2.33+")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = libc.malloc(size)
    try:
        return libc.mallinfo2().hblkhd
    finally:
        libc.free(block)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_bounded_heap_maps_activation_sized_blocks_on_their_own_and_restores():
    import ctypes

    from loraqa.runtime import bounded_heap

    trim = ctypes.CDLL("libc.so.6").malloc_trim
    trim.argtypes = [ctypes.c_size_t]

    keep_freed_memory()  # blocks up to 32 MiB come from the heap
    size = 8 << 20  # more than any free chunk: glibc maps a block only when no free chunk fits it

    def mapped_growth() -> int:
        trim(0)  # shrinks the heap's top, so the block needs new memory
        return _mapped_bytes_after_malloc(size) - _mapped_bytes_after_malloc(1)

    assert mapped_growth() < size  # from the heap
    with bounded_heap():
        assert mapped_growth() >= size  # its own mapping: given back when freed
    assert mapped_growth() < size  # the setting is restored
    with bounded_heap(enabled=False):
        assert mapped_growth() < size
