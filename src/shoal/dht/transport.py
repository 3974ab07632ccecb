"""The RPC boundary of the DHT: what the protocol needs from a network, nothing more.

Two sides:

* ``DHTTransport`` (client): four calls, each with its own deadline. Implementations raise
  only Shoal errors: ``PeerTimeout`` past the deadline, ``PeerUnavailable`` when the peer
  cannot be reached, ``ProtocolViolation`` for a malformed answer, ``RemoteError`` when
  the peer refused the request.
* ``DHTHandler`` (server): what a node answers. The transport tells it who is calling (the
  authenticated PeerID plus the address the caller says it listens at).

The protocol code in ``node.py`` / ``lookup.py`` sees only these two, so it runs unchanged
over the in-memory simulator (``memory.py``) and over gRPC (``grpc_transport.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from shoal.dht.ids import Contact
from shoal.dht.record import Record, Rejection

__all__ = ["DHTHandler", "DHTTransport", "FindValueAnswer", "StoreAnswer"]

MAX_CONTACTS_PER_ANSWER = 32


@dataclass(frozen=True, slots=True)
class FindValueAnswer:
    """Records the peer holds for the key (maybe none) and contacts closer to it."""

    records: list[Record]
    closer: list[Contact]


@dataclass(frozen=True, slots=True)
class StoreAnswer:
    """One entry per stored record: None when accepted, else the reason it was refused."""

    results: list[Rejection | None]


class DHTTransport(Protocol):
    """Client side of the four Kademlia RPCs."""

    async def ping(self, peer: Contact, *, timeout_s: float) -> Contact:
        """Returns the responder's contact (its PeerID is the one that answered)."""
        ...

    async def ping_address(self, address: str, *, timeout_s: float) -> Contact:
        """Ping an address whose PeerID we do not know yet (bootstrap); returns its contact."""
        ...

    async def store(
        self, peer: Contact, records: Sequence[Record], *, timeout_s: float
    ) -> StoreAnswer: ...

    async def find_node(self, peer: Contact, target: int, *, timeout_s: float) -> list[Contact]: ...

    async def find_value(
        self, peer: Contact, location: int, *, timeout_s: float
    ) -> FindValueAnswer: ...


class DHTHandler(Protocol):
    """Server side: answers for one node. ``caller`` is authenticated by the transport."""

    def handle_ping(self, caller: Contact | None) -> Contact: ...

    def handle_store(self, caller: Contact | None, records: Sequence[Record]) -> StoreAnswer: ...

    def handle_find_node(self, caller: Contact | None, target: int) -> list[Contact]: ...

    def handle_find_value(self, caller: Contact | None, location: int) -> FindValueAnswer: ...
