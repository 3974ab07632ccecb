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
    """Reusable receive buffers, at most ``max_bytes`` pooled in total.

    Buffers are kept by exact size. Part sizes change with a group's members and shares, so
    when a new size does not fit, idle buffers of the sizes used least recently go first:
    a pool full of sizes no round asks for any more would otherwise never pool again.
    """

    def __init__(self, max_bytes: int = 1 << 30, min_pooled_bytes: int = 1 << 20) -> None:
        self.max_bytes = max_bytes
        self.min_pooled_bytes = min_pooled_bytes
        self._buffers: dict[int, list[bytearray]] = {}  # least recently used size first
        self.pooled_bytes = 0
        self.reused = 0

    def take(self, nbytes: int) -> bytearray:
        """A buffer of exactly ``nbytes`` (contents undefined)."""
        if nbytes < self.min_pooled_bytes:
            return bytearray(nbytes)
        same = self._buffers.pop(nbytes, [])
        self._buffers[nbytes] = same  # now the most recently used size
        for buf in same:
            if sys.getrefcount(buf) <= _IDLE_REFS:
                self.reused += 1
                return buf
        buf = bytearray(nbytes)
        if self._make_room(nbytes):
            same.append(buf)
            self.pooled_bytes += nbytes
        elif not same:
            del self._buffers[nbytes]
        return buf

    def _make_room(self, nbytes: int) -> bool:
        """Drop idle buffers, least recently used sizes first, until ``nbytes`` more fit."""
        if nbytes > self.max_bytes:  # would never fit: keep what is pooled
            return False
        for size in list(self._buffers):
            if self.pooled_bytes + nbytes <= self.max_bytes:
                break
            kept = self._buffers[size]
            busy: list[bytearray] = []
            while kept and self.pooled_bytes + nbytes > self.max_bytes:
                buf = kept.pop()
                if sys.getrefcount(buf) <= 2:  # this name and getrefcount's argument
                    self.pooled_bytes -= len(buf)
                else:
                    busy.append(buf)
            kept.extend(busy)
            if not kept and size != nbytes:
                del self._buffers[size]
        return self.pooled_bytes + nbytes <= self.max_bytes

    def tensor(self, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A 1-D tensor over a pooled buffer (contents undefined)."""
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        return torch.frombuffer(self.take(numel * itemsize), dtype=dtype)
