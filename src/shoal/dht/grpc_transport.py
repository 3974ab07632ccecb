"""The DHT over gRPC: ``GrpcTransport`` (client) and ``DHTService`` (server) on a NetRuntime.

Authentication, deadlines, retries and error mapping come from ``shoal.net``: calls raise
only Shoal errors, and the servicer learns the caller's PeerID from ``current_caller()``.
The caller's advertised address travels in each request (empty for client-only nodes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shoal.dht.config import RecordLimits
from shoal.dht.ids import MAX_ADDRESS_CHARS, Contact
from shoal.dht.record import Record
from shoal.dht.transport import DHTHandler, FindValueAnswer, StoreAnswer
from shoal.dht.wire import (
    contact_to_pb,
    contacts_from_pb,
    id_from_pb,
    id_to_pb,
    record_to_pb,
    records_from_pb,
    rejection_from_pb,
)
from shoal.errors import ProtocolViolation
from shoal.net import NetRuntime, current_caller
from shoal.net.proto.v1 import dht_pb2 as pb
from shoal.net.proto.v1 import dht_pb2_grpc as rpc

__all__ = ["DHTService", "GrpcTransport"]


class GrpcTransport:
    """``DHTTransport`` through a ``NetRuntime``'s authenticated channel pool."""

    def __init__(self, runtime: NetRuntime, own_address: str | None, limits: RecordLimits) -> None:
        self._runtime = runtime
        self._own = own_address or ""
        self._limits = limits

    def _stub(self, address: str, peer: Contact | None) -> Any:
        return self._runtime.stub(rpc.DHTStub, address, peer.peer_id if peer else None)

    async def ping(self, peer: Contact, *, timeout_s: float) -> Contact:
        stub = self._stub(peer.address, peer)
        await stub.Ping(pb.DHTPingRequest(caller_address=self._own), timeout_s=timeout_s)
        return peer

    async def ping_address(self, address: str, *, timeout_s: float) -> Contact:
        stub = self._stub(address, None)
        await stub.Ping(pb.DHTPingRequest(caller_address=self._own), timeout_s=timeout_s)
        # The dialled address with the PeerID the handshake proved.
        return Contact(stub.peer_id, address)

    async def store(
        self, peer: Contact, records: Sequence[Record], *, timeout_s: float
    ) -> StoreAnswer:
        request = pb.DHTStoreRequest(
            caller_address=self._own, records=[record_to_pb(r) for r in records]
        )
        reply = await self._stub(peer.address, peer).Store(request, timeout_s=timeout_s)
        if len(reply.rejections) != len(records):
            raise ProtocolViolation("store answer does not match the request", peer=peer.address)
        return StoreAnswer([rejection_from_pb(code) for code in reply.rejections])

    async def find_node(self, peer: Contact, target: int, *, timeout_s: float) -> list[Contact]:
        request = pb.DHTFindNodeRequest(caller_address=self._own, target=id_to_pb(target))
        reply = await self._stub(peer.address, peer).FindNode(
            request, timeout_s=timeout_s, idempotent=True
        )
        return contacts_from_pb(reply.closer)

    async def find_value(
        self, peer: Contact, location: int, *, timeout_s: float
    ) -> FindValueAnswer:
        request = pb.DHTFindValueRequest(caller_address=self._own, location=id_to_pb(location))
        reply = await self._stub(peer.address, peer).FindValue(
            request, timeout_s=timeout_s, idempotent=True
        )
        return FindValueAnswer(
            records_from_pb(reply.records, self._limits), contacts_from_pb(reply.closer)
        )


def _caller(address: str) -> Contact | None:
    if not address:
        return None
    if len(address) > MAX_ADDRESS_CHARS or not address.isprintable():
        raise ProtocolViolation("caller address too long or not printable")
    return Contact(current_caller(), address)


class DHTService(rpc.DHTServicer):
    """gRPC handlers: parse and bound the request, then ask the node (``DHTHandler``)."""

    def __init__(self, node: DHTHandler, limits: RecordLimits) -> None:
        self._node = node
        self._limits = limits

    async def Ping(self, request: Any, context: Any) -> Any:
        me = self._node.handle_ping(_caller(request.caller_address))
        return pb.DHTPingResponse(self=contact_to_pb(me))

    async def Store(self, request: Any, context: Any) -> Any:
        records = records_from_pb(request.records, self._limits)
        answer = self._node.handle_store(_caller(request.caller_address), records)
        return pb.DHTStoreResponse(rejections=[r.name if r else "" for r in answer.results])

    async def FindNode(self, request: Any, context: Any) -> Any:
        target = id_from_pb(request.target)
        closer = self._node.handle_find_node(_caller(request.caller_address), target)
        return pb.DHTFindNodeResponse(closer=[contact_to_pb(c) for c in closer])

    async def FindValue(self, request: Any, context: Any) -> Any:
        location = id_from_pb(request.location)
        answer = self._node.handle_find_value(_caller(request.caller_address), location)
        return pb.DHTFindValueResponse(
            records=[record_to_pb(r) for r in answer.records],
            closer=[contact_to_pb(c) for c in answer.closer],
        )
