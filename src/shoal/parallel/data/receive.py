"""Receiving round tensors into reused buffers.

A 25M-parameter round makes every peer receive about 150 MB; allocating a fresh zeroed
buffer for each part costs more than copying the bytes (page faults). :class:`BufferPool`
hands out ``bytearray`` buffers by size and takes one back automatically once nothing
views it any more (its reference count drops to the pool's own), so a buffer is never
reused while a tensor still reads it.

:func:`read_tensor_into_pool` reads one tensor of a ``shoal.v1.TensorFrame`` stream: it
checks the header with ``shoal.net.tensors.check_header`` before taking a buffer, bounds
every chunk, and verifies the xxHash3 checksum, like ``TensorReader.read_body``, but fills a
pooled buffer instead of a new one.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import Any

import torch
import xxhash

from shoal.errors import ProtocolViolation
from shoal.net.config import MiB, TensorLimits
from shoal.net.proto.v1 import tensor_pb2
from shoal.net.tensors import RAW, Chunk, as_tensor, check_header

__all__ = ["BufferPool", "read_tensor_into_pool"]

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


async def read_tensor_into_pool(
    frames: AsyncIterator[Any], limits: TensorLimits, pool: BufferPool
) -> torch.Tensor:
    """The next raw tensor of ``frames`` (header, then chunks), in a pooled buffer."""
    frame = await _next(frames)
    if isinstance(frame, Chunk) or frame.WhichOneof("frame") != "header":
        raise ProtocolViolation("expected a tensor header frame")
    header: tensor_pb2.TensorHeader = frame.header
    check_header(header, limits)
    if header.codec != RAW:
        raise ProtocolViolation(f"expected a raw tensor, got codec {header.codec!r}")
    total = header.byte_length
    buf = pool.take(total)
    view = memoryview(buf)
    hasher = xxhash.xxh3_64()
    pos = 0
    while pos < total:
        frame = await _next(frames)
        if isinstance(frame, Chunk):
            data = frame.data
        elif frame.WhichOneof("frame") == "chunk":
            data = memoryview(frame.chunk)
        else:
            raise ProtocolViolation(f"expected a chunk at byte {pos} of {total}")
        n = data.nbytes
        if n == 0 or n > MiB or pos + n > total:
            raise ProtocolViolation(f"chunk of {n} bytes at {pos} overruns {total}")
        view[pos : pos + n] = data
        hasher.update(data)
        pos += n
    view.release()
    if hasher.intdigest() != header.checksum:
        raise ProtocolViolation(f"tensor checksum mismatch ({total} bytes)")
    return as_tensor(header, buf)


async def _next(frames: AsyncIterator[Any]) -> Any:
    try:
        return await frames.__anext__()
    except StopAsyncIteration:
        raise ProtocolViolation("tensor stream ended early") from None
