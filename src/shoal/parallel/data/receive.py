"""Receiving round tensors into reused buffers.

:func:`read_tensor_into_pool` reads one tensor of a ``shoal.v1.TensorFrame`` stream: it
checks the header with ``shoal.net.tensors.check_header`` before taking a buffer, bounds
every chunk, and verifies the xxHash3 checksum, like ``TensorReader.read_body``, but fills a
pooled buffer instead of a new one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import torch
import xxhash

from shoal.errors import ProtocolViolation
from shoal.net.config import MiB, TensorLimits
from shoal.net.proto.v1 import tensor_pb2
from shoal.net.tensors import RAW, Chunk, as_tensor, check_header
from shoal.parallel.data.buffers import BufferPool

__all__ = ["read_tensor_into_pool"]


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
