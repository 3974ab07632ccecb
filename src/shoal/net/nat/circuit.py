"""The client half of a relayed circuit: a gRPC bidi stream seen as a local byte stream.

``open_circuit(method, first, ...)`` starts ``method`` (``Relay.Connect`` or ``Relay.Accept``
of a ``Stub``) with ``first`` as its first frame, waits for the relay's ``open`` frame, and
returns one end of a local socket pair; a task owned by ``tasks`` carries bytes between the
other end and the stream (payload frames of at most ``MAX_FRAME_BYTES``). The returned
``(reader, writer)`` is what ``LocalEndpoint`` splices into a gRPC channel (dialing side) or
what ``bridge_to_unix`` splices into the local server (target side). When either the stream
or the local end finishes, the other is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

from shoal.errors import NetworkError, PeerTimeout, PeerUnavailable, ProtocolViolation
from shoal.net.aio import within
from shoal.net.nat.bridge import Streams
from shoal.net.nat.limits import MAX_FRAME_BYTES
from shoal.net.proto.v1 import relay_pb2
from shoal.net.tasks import TaskSet

__all__ = ["CircuitStats", "open_circuit", "socket_pair"]

_SOCKET_BUFFER_BYTES = 1 << 20


class CircuitStats:
    """Payload bytes carried by one circuit end, live."""

    __slots__ = ("received", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0


async def socket_pair() -> tuple[Streams, Streams]:
    """Two connected local stream ends."""
    a, b = socket.socketpair()
    for sock in (a, b):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER_BYTES)
    return await asyncio.open_connection(sock=a), await asyncio.open_connection(sock=b)


async def _frames(
    first: relay_pb2.RelayFrame, reader: asyncio.StreamReader, stats: CircuitStats
) -> AsyncIterator[relay_pb2.RelayFrame]:
    yield first
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(MAX_FRAME_BYTES):
            stats.sent += len(chunk)
            yield relay_pb2.RelayFrame(data=chunk)


async def _carry(responses: AsyncIterator[Any], end: Streams, stats: CircuitStats) -> None:
    writer = end[1]
    try:
        async for frame in responses:
            if len(frame.data) > MAX_FRAME_BYTES:
                raise ProtocolViolation(f"relay frame of {len(frame.data)} bytes")
            if frame.data:
                writer.write(frame.data)
                await writer.drain()
                stats.received += len(frame.data)
    except (NetworkError, ConnectionError):
        pass
    finally:
        writer.transport.abort()
        with contextlib.suppress(Exception):
            await responses.aclose()  # type: ignore[attr-defined]


async def open_circuit(
    method: Callable[..., AsyncIterator[Any]],
    first: relay_pb2.RelayFrame,
    *,
    tasks: TaskSet,
    open_timeout_s: float,
    lifetime_s: float,
    stats: CircuitStats | None = None,
) -> Streams:
    """Open a relayed stream; see the module docstring.

    Raises:
        PeerUnavailable: the relay refused, or the target did not accept.
        PeerTimeout: no ``open`` frame within ``open_timeout_s``.
    """
    stats = stats if stats is not None else CircuitStats()
    mine, theirs = await socket_pair()
    responses = method(_frames(first, theirs[0], stats), timeout_s=lifetime_s)
    try:
        frame = await within(responses.__anext__(), open_timeout_s)
        if not frame.open:
            raise ProtocolViolation("relay answered a circuit without an open frame")
    except BaseException as exc:
        mine[1].transport.abort()
        theirs[1].transport.abort()
        with contextlib.suppress(Exception):
            await responses.aclose()  # type: ignore[attr-defined]
        if isinstance(exc, asyncio.TimeoutError):
            raise PeerTimeout(f"relay did not open the circuit within {open_timeout_s} s") from None
        if isinstance(exc, StopAsyncIteration):
            raise PeerUnavailable("relay closed the circuit before opening it") from None
        raise
    tasks.spawn(_carry(responses, theirs, stats), name="relay-circuit")
    return mine
