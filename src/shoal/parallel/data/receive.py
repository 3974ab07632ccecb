"""Receiving round tensors into reused buffers.

:func:`read_tensor_into_pool` reads one raw tensor of a ``shoal.v1.TensorFrame`` stream with
``shoal.net.tensors.TensorReader`` (header checked before a buffer is taken, every chunk
bounded, xxHash3 verified), filling a pooled buffer instead of a new one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import torch

from shoal.errors import ProtocolViolation
from shoal.net.config import TensorLimits
from shoal.net.proto.v1 import tensor_pb2
from shoal.net.tensors import RAW, Chunk, TensorReader, as_tensor

__all__ = ["read_tensor_into_pool"]


async def read_tensor_into_pool(
    frames: AsyncIterator[Any], limits: TensorLimits, take: Callable[[int], bytearray]
) -> torch.Tensor:
    """The next raw tensor of ``frames`` (header, then chunks), in a buffer from ``take``
    (e.g. ``BufferPool.take``; called once the header passed its checks)."""
    frame = await _next(frames)
    if isinstance(frame, Chunk) or frame.WhichOneof("frame") != "header":
        raise ProtocolViolation("expected a tensor header frame")
    header: tensor_pb2.TensorHeader = frame.header
    if header.codec != RAW:
        raise ProtocolViolation(f"expected a raw tensor, got codec {header.codec!r}")
    _, buf = await TensorReader(frames, limits).read_body(header, alloc=take)
    return as_tensor(header, buf)


async def _next(frames: AsyncIterator[Any]) -> Any:
    try:
        return await frames.__anext__()
    except StopAsyncIteration:
        raise ProtocolViolation("tensor stream ended early") from None
