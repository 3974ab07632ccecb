"""Keep freed heap memory in the process instead of returning it to the kernel.

A peer moves hundreds of MB per round through 1 MiB messages: gRPC allocates a fresh
buffer for every message it receives, and our send path one per chunk. glibc's defaults
hand memory above its trim threshold back to the kernel and take it again on the next
round, and every page of it is faulted in again: on this project's 4-peer, 25M-parameter
all-reduce benchmark it cut the system time of a round by about 15% (0.44 → 0.37 CPU-s,
all peers together, mean of 3 alternating runs of 10 rounds).

:func:`keep_freed_memory` raises glibc's mmap threshold (so 1 MiB buffers come from the
heap, not from a fresh mapping each) and its trim threshold (so the heap is not shrunk
between rounds). The cost is that the process keeps its peak heap (up to ``trim_bytes``
above its live data) for reuse. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import threading

__all__ = ["keep_freed_memory"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit (HEAP_MAX_SIZE / 2)

_lock = threading.Lock()
_applied: bool | None = None


def keep_freed_memory(trim_bytes: int = 512 * 1024 * 1024) -> bool:
    """Tune glibc's allocator once per process; True if it is (now or already) tuned."""
    global _applied
    with _lock:
        if _applied is not None:
            return _applied
        _applied = False
        if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            return False
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1)
            ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_bytes) == 1) and ok
        except (OSError, AttributeError) as exc:
            log.debug("allocator tuning unavailable: %s", exc)
            return False
        _applied = ok
        return ok
