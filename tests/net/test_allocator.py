"""The allocator tuning applies once, on glibc, and leaves allocation working."""

from __future__ import annotations

import platform

import pytest

from shoal.net import allocator


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_applies_once_and_allocation_still_works():
    assert allocator.keep_freed_memory() is True
    assert allocator.keep_freed_memory() is True  # idempotent: mallopt is not called again
    chunks = [bytearray(1 << 20) for _ in range(64)]  # 1 MiB buffers, as messages are
    del chunks[::2]
    assert all(len(c) == 1 << 20 for c in chunks)
