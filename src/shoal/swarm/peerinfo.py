"""``PeerInfo``: what a peer announces about itself in its heartbeat, and its wire form.

The wire form is a msgpack map with short fixed keys and a schema version. Every field is
bounded (counts, lengths, numeric ranges) and checked on decode before use; unknown keys
are ignored (so newer peers can add fields) but the map size is capped. The PeerID is not
in the payload: it is the signed writer of the DHT record that carries it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import msgpack

from shoal.errors import ProtocolViolation

__all__ = ["PeerInfo", "Reachability", "decode_peer_info", "encode_peer_info"]

MAX_ADDRESSES = 8
MAX_ADDRESS_CHARS = 256
MAX_ROLES = 16
MAX_ROLE_CHARS = 128  # a trainer's role holds its round scope
MAX_VERSION_CHARS = 32
MAX_THROUGHPUT = 1e12
MAX_INFO_BYTES = 4096
_SCHEMA = 1


class Reachability(enum.Enum):
    """How other peers can reach this one."""

    UNKNOWN = "unknown"
    DIRECT = "direct"
    """Accepts inbound connections at its addresses."""
    RELAYED = "relayed"
    """Behind a NAT; reachable through the relay peer named in ``relay``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerInfo:
    """One peer's self-description (bounded; see the module constants)."""

    addresses: tuple[str, ...] = ()
    """``host:port`` addresses the peer listens at, best first."""
    reachability: Reachability = Reachability.UNKNOWN
    relay: bytes = b""
    """Raw PeerID of the relay when ``reachability`` is RELAYED, else empty."""
    roles: tuple[str, ...] = ()
    """What the peer serves, e.g. ``"dht"``, ``"trainer"``, ``"stage:3"``."""
    throughput: float = 0.0
    """Measured useful work rate (samples/s) that schedulers weigh peers by."""
    version: str = ""
    """Shoal version string."""

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem:
            raise ValueError(f"invalid PeerInfo: {problem}")


def _problem(info: PeerInfo) -> str | None:
    if len(info.addresses) > MAX_ADDRESSES:
        return f"more than {MAX_ADDRESSES} addresses"
    if any(
        not isinstance(a, str) or not 0 < len(a) <= MAX_ADDRESS_CHARS or not a.isprintable()
        for a in info.addresses
    ):
        return "an address is empty, too long or not printable"
    if len(info.roles) > MAX_ROLES:
        return f"more than {MAX_ROLES} roles"
    if any(
        not isinstance(r, str) or not 0 < len(r) <= MAX_ROLE_CHARS or not r.isprintable()
        for r in info.roles
    ):
        return "a role is empty, too long or not printable"
    if not isinstance(info.version, str) or len(info.version) > MAX_VERSION_CHARS:
        return "version too long"
    if (
        not isinstance(info.throughput, float)
        or not math.isfinite(info.throughput)
        or not 0 <= info.throughput <= MAX_THROUGHPUT
    ):
        return f"throughput must be a finite float in [0, {MAX_THROUGHPUT:g}]"
    if info.relay and len(info.relay) != 32:
        return "relay must be a 32-byte PeerID or empty"
    if bool(info.relay) != (info.reachability is Reachability.RELAYED):
        return "relay is set exactly when reachability is RELAYED"
    return None


def encode_peer_info(info: PeerInfo) -> bytes:
    packed: bytes = msgpack.packb(
        {
            "v": _SCHEMA,
            "a": list(info.addresses),
            "r": info.reachability.value,
            "y": info.relay,
            "o": list(info.roles),
            "t": info.throughput,
            "s": info.version,
        },
        use_bin_type=True,
    )
    return packed


def decode_peer_info(data: bytes) -> PeerInfo:
    """Parse and bound a heartbeat payload; raises ProtocolViolation on anything off."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_INFO_BYTES:
        raise ProtocolViolation("peer info too large or not bytes")
    try:
        obj = msgpack.unpackb(
            bytes(data),
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_ADDRESS_CHARS,
            max_bin_len=32,
            max_array_len=max(MAX_ADDRESSES, MAX_ROLES),
            max_map_len=16,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolViolation(f"undecodable peer info: {type(exc).__name__}") from exc
    if not isinstance(obj, dict) or obj.get("v") != _SCHEMA:
        raise ProtocolViolation("peer info is not a schema-1 map")
    addresses, roles = obj.get("a", []), obj.get("o", [])
    reach, relay, version = obj.get("r", "unknown"), obj.get("y", b""), obj.get("s", "")
    throughput = obj.get("t", 0.0)
    if not isinstance(addresses, list) or not isinstance(roles, list):
        raise ProtocolViolation("peer info addresses/roles are not lists")
    if not isinstance(relay, bytes) or not isinstance(version, str) or not isinstance(reach, str):
        raise ProtocolViolation("peer info fields have wrong types")
    if isinstance(throughput, bool) or not isinstance(throughput, (int, float)):
        raise ProtocolViolation("peer info throughput is not a number")
    try:
        return PeerInfo(
            addresses=tuple(addresses),
            reachability=Reachability(reach),
            relay=relay,
            roles=tuple(roles),
            throughput=float(throughput),
            version=version,
        )
    except ValueError as exc:
        raise ProtocolViolation(str(exc)) from exc
