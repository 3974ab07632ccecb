"""Reusable large buffers.

A 25M-parameter round makes every peer receive about 150 MB and produce 25 MB of
reduced values; allocating a fresh zeroed buffer for each costs more than copying the
bytes (page faults). :class:`BufferPool` hands out ``bytearray`` buffers by size and takes
one back automatically once nothing views it any more (its reference count drops to the
pool's own), so a buffer is never reused while a tensor still reads it.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["BufferPool"]

# References to a pooled buffer when nobody else holds it: the pool's list, the loop
# variable and getrefcount's own argument.
_IDLE_REFS = 3


class BufferPool:
    """Reusable receive buffers, at most ``max_bytes`` pooled in total."""

    def __init__(self, max_bytes: int = 1 << 30, min_pooled_bytes: int = 1 << 20) -> None:
        self.max_bytes = max_bytes
        self.min_pooled_bytes = min_pooled_bytes
        self._buffers: dict[int, list[bytearray]] = {}
        self.pooled_bytes = 0
        self.reused = 0

    def take(self, nbytes: int) -> bytearray:
        """A buffer of exactly ``nbytes`` (contents undefined)."""
        if nbytes < self.min_pooled_bytes:
            return bytearray(nbytes)
        same = self._buffers.setdefault(nbytes, [])
        for buf in same:
            if sys.getrefcount(buf) <= _IDLE_REFS:
                self.reused += 1
                return buf
        buf = bytearray(nbytes)
        if self.pooled_bytes + nbytes <= self.max_bytes:
            same.append(buf)
            self.pooled_bytes += nbytes
        return buf

    def tensor(self, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A 1-D tensor over a pooled buffer (contents undefined)."""
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        return torch.frombuffer(self.take(numel * itemsize), dtype=dtype)
