"""Advertising "reachable via relay R" in the DHT, and reading it back (bounded codec).

A peer behind a NAT stores, under ``relay_key(its PeerID)``, a dictionary record whose
subkey it owns (the DHT refuses anyone else's write there), listing the relays that hold a
reservation for it: ``msgpack([[relay PeerID raw, "host:port"], ...])``. Readers take only
the subkey of the peer itself, so nobody can redirect another peer's traffic.
"""

from __future__ import annotations

import time
from typing import Protocol

import msgpack

from shoal.errors import ProtocolViolation
from shoal.net.identity import PeerID
from shoal.net.nat.reserve import RelayAddress

__all__ = [
    "MAX_ADVERTISED_RELAYS",
    "RecordStore",
    "advertise",
    "decode_relays",
    "encode_relays",
    "relay_key",
    "relays_of",
    "resolve",
]

MAX_ADVERTISED_RELAYS = 8
_MAX_ADDRESS_CHARS = 128
_MAX_BYTES = 2048


class RecordStore(Protocol):
    """What ``DHTNode`` offers (``store`` / ``get``)."""

    async def store(
        self, key: bytes, value: bytes, expires_at: float, subkey: bytes | None = None
    ) -> int: ...

    async def get(self, key: bytes) -> bytes | dict[bytes, bytes] | None: ...


def relay_key(peer: PeerID) -> bytes:
    return b"shoal/v1/nat/relays/" + peer.raw.hex().encode()


def encode_relays(relays: list[RelayAddress]) -> bytes:
    rows = [
        [r.peer_id.raw if r.peer_id is not None else b"", r.address]
        for r in relays[:MAX_ADVERTISED_RELAYS]
    ]
    data: bytes = msgpack.packb(rows, use_bin_type=True)
    return data


def decode_relays(data: bytes) -> list[RelayAddress]:
    """Bounded decode; ProtocolViolation on anything malformed."""
    if len(data) > _MAX_BYTES:
        raise ProtocolViolation(f"relay advert of {len(data)} bytes")
    try:
        rows = msgpack.unpackb(data, raw=False, max_array_len=MAX_ADVERTISED_RELAYS * 2)
    except (ValueError, msgpack.exceptions.ExtraData) as exc:
        raise ProtocolViolation(f"relay advert does not decode: {exc}") from exc
    if not isinstance(rows, list) or len(rows) > MAX_ADVERTISED_RELAYS:
        raise ProtocolViolation("relay advert is not a short list")
    out = []
    for row in rows:
        if (
            not isinstance(row, list)
            or len(row) != 2
            or not isinstance(row[0], bytes)
            or len(row[0]) not in (0, 32)
            or not isinstance(row[1], str)
            or not 0 < len(row[1]) <= _MAX_ADDRESS_CHARS
        ):
            raise ProtocolViolation("malformed relay advert entry")
        out.append(RelayAddress(row[1], PeerID(row[0]) if row[0] else None))
    return out


def relays_of(peer: PeerID, value: bytes | dict[bytes, bytes] | None) -> list[RelayAddress]:
    """The relays ``peer`` advertised, from a DHT ``get(relay_key(peer))`` answer."""
    if not isinstance(value, dict):
        return []
    own = value.get(peer.raw)
    if own is None:
        return []
    try:
        return decode_relays(own)
    except ProtocolViolation:
        return []


async def advertise(
    dht: RecordStore, peer: PeerID, relays: list[RelayAddress], ttl_s: float = 120.0
) -> int:
    """Store "``peer`` is reachable via ``relays``" (our own subkey); replicas that took it."""
    return await dht.store(relay_key(peer), encode_relays(relays), time.time() + ttl_s, subkey=b"")


async def resolve(dht: RecordStore, peer: PeerID) -> list[RelayAddress]:
    """The relays ``peer`` advertised (empty when none or malformed)."""
    return relays_of(peer, await dht.get(relay_key(peer)))
