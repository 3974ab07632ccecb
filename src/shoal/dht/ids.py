"""Kademlia identifiers: 256-bit node IDs and key locations, XOR distance, contacts.

Vocabulary used across ``shoal.dht``:

* **node ID**: ``PeerID.digest()`` (SHA-256 of the public key) read as a big-endian int.
* **location**: where a key lives, ``sha256(key)`` read the same way.
* **distance**: ``a ^ b``; the bucket of ``b`` as seen from ``a`` is ``distance.bit_length() - 1``.
* **contact**: a peer's PeerID plus the address it can be dialled at.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from shoal.net.identity import PeerID

__all__ = ["ID_BITS", "Contact", "bucket_index", "distance", "location_of"]

ID_BITS = 256
MAX_ADDRESS_CHARS = 256


def location_of(key: bytes) -> int:
    """The 256-bit location of a DHT key."""
    return int.from_bytes(hashlib.sha256(key).digest(), "big")


def distance(a: int, b: int) -> int:
    return a ^ b


def bucket_index(own: int, other: int) -> int:
    """Index of the bucket that holds ``other`` in ``own``'s table (0..255); -1 for itself."""
    return (own ^ other).bit_length() - 1


@dataclass(frozen=True, slots=True)
class Contact:
    """A peer's identity and the address it listens at (``host:port`` or a simulated name)."""

    peer_id: PeerID
    address: str
    node_id: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.address, str) or not 0 < len(self.address) <= MAX_ADDRESS_CHARS:
            raise ValueError(f"contact address must be 1..{MAX_ADDRESS_CHARS} chars")
        object.__setattr__(self, "node_id", int.from_bytes(self.peer_id.digest(), "big"))

    def __repr__(self) -> str:
        return f"Contact({self.peer_id.short()}@{self.address})"
