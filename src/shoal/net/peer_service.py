"""The ``shoal.v1.Peer`` service every peer serves: handshake, ping, info, link probes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import torch

from shoal import __version__ as shoal_version
from shoal.errors import ProtocolViolation
from shoal.net.auth import AuthFailure, SessionTable
from shoal.net.config import NetConfig
from shoal.net.identity import Identity, PeerID
from shoal.net.proto.v1 import peer_pb2, peer_pb2_grpc, tensor_pb2
from shoal.net.tensors import TensorReader, tensor_frames


class PeerService(peer_pb2_grpc.PeerServicer):
    """Handlers of ``shoal.v1.Peer``; ``addresses`` and ``roles`` are read per call."""

    def __init__(
        self,
        identity: Identity,
        sessions: SessionTable,
        config: NetConfig,
        addresses: Callable[[], list[str]],
        roles: Callable[[], list[str]],
        clock: Callable[[], float] = time.time,
        on_session: Callable[[PeerID], None] | None = None,
    ) -> None:
        """``on_session(peer)``: called after each handshake accepted from ``peer``."""
        self._on_session = on_session
        self._identity = identity
        self._sessions = sessions
        self._config = config
        self._addresses = addresses
        self._roles = roles
        self._clock = clock

    async def Handshake(
        self, request: peer_pb2.HandshakeRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.HandshakeResponse:
        try:
            response = self._sessions.accept(request, self._clock())
        except AuthFailure as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"shoal-auth:{exc}")
            raise  # unreachable: abort raises
        if self._on_session is not None:
            self._on_session(PeerID.from_bytes(request.peer_id))  # checked by accept
        return response

    async def Ping(
        self, request: peer_pb2.PingRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.PingResponse:
        if len(request.payload) > self._config.max_ping_payload_bytes:
            raise ProtocolViolation(f"ping payload of {len(request.payload)} bytes")
        return peer_pb2.PingResponse(payload=request.payload, time_ms=int(self._clock() * 1000))

    async def Info(
        self, request: peer_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.PeerInfo:
        return peer_pb2.PeerInfo(
            peer_id=self._identity.peer_id.raw,
            version=shoal_version,
            addresses=self._addresses(),
            roles=self._roles(),
        )

    async def Absorb(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> tensor_pb2.TensorAck:
        reader = TensorReader(request_iterator, self._config.tensor_limits)
        frames = request_iterator.__aiter__()
        tensors = 0
        async for frame in frames:
            if (
                not isinstance(frame, tensor_pb2.TensorFrame)
                or frame.WhichOneof("frame") != "header"
            ):
                raise ProtocolViolation("Absorb expects a header before each tensor")
            await reader.read_body(frame.header)
            tensors += 1
        return tensor_pb2.TensorAck(byte_length=reader.bytes_received, tensors=tensors)

    async def Emit(
        self, request: peer_pb2.EmitRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        if request.byte_length > self._config.max_emit_bytes:
            raise ProtocolViolation(
                f"Emit of {request.byte_length} bytes exceeds {self._config.max_emit_bytes}"
            )
        chunk = request.chunk_bytes or self._config.chunk_bytes
        if chunk > self._config.chunk_bytes:
            raise ProtocolViolation(
                f"Emit chunk of {chunk} bytes exceeds {self._config.chunk_bytes}"
            )
        payload = torch.zeros(request.byte_length, dtype=torch.uint8)
        for frame in tensor_frames(payload, name="emit", chunk_bytes=chunk):
            yield frame


__all__ = ["PeerService"]
