"""The rendezvous board on the DHT: one signed, owned subkey per ready peer.

Every peer ready for a round stores a small record under ``prefix + round key`` with its
own subkey, so the DHT's rule "a subkey can only be written by its owner" authenticates the
announcement: the peer id is read from the signed subkey, never from the value. The value
is msgpack ``[version, weight, uplink_bps, downlink_bps, client_mode, address, expected,
nonce, closed]``; readers
bound and type-check every field and skip records that do not parse. Group confirmations live under
``prefix + round key + b"/confirm"`` the same way, valued ``[version, group_id]``.

``expires_at`` is on the DHT's wall clock (Unix seconds): give :func:`find_group` the same
clock (``time.time`` in a swarm, the simulator's wall clock in tests). The DHT keeps, per
subkey, the record that expires last and refuses the other, so writes under one key get
strictly increasing expiries here: a retry's shorter window (or a confirmation posted
right after a withdrawal) would otherwise lose to the earlier attempt's record. A restarted
peer has the same subkey and no memory of its earlier writes, so reads note the expiry of
this peer's own records too: a write after such a read outlives what it must replace.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import msgpack

from shoal.dht.node import freshest_by_subkey
from shoal.parallel.data.matchmaking import NONCE_BYTES, ReadyPeer

if TYPE_CHECKING:
    from shoal.dht.record import Record

__all__ = ["DhtBoard", "RecordStore"]

BOARD_VERSION = 7
"""Format of board values; peers of other formats do not read each other's entries (round
scopes carry it, so they do not count each other either). 6: the same values as 5, read
another way (withdrawals looked up before a window closes early, the median of the counts
waited for), and snapshots announced under the round scope, where peers of 5 neither find
nor serve them: a joiner of one version among peers of the other found no donor, yet
counted on them. 7: the same values, and a round of several groups goes on across them,
where peers of 6 would hold up every column they are seated in."""
_PEER_ID_BYTES = 32
_MAX_VALUE_BYTES = 512
_MAX_ADDRESS_CHARS = 256
_MAX_GROUP_ID_BYTES = 64
_MAX_EXPECTED = 1 << 16
_CONFIRM = b"/confirm"
_REMEMBERED_KEYS = 1024
_EXPIRY_STEP_S = 1e-3
T = TypeVar("T")


class RecordStore(Protocol):
    """What the board needs from ``shoal.dht`` (``DHTNode`` provides it)."""

    async def store(
        self, key: bytes, value: bytes, expires_at: float, subkey: bytes | None = None
    ) -> int: ...

    async def get_records(self, key: bytes) -> list[Record]: ...


class DhtBoard:
    """:class:`~shoal.parallel.data.board.RendezvousBoard` over a DHT node."""

    def __init__(self, dht: RecordStore, prefix: bytes = b"shoal/avg/") -> None:
        self.dht = dht
        self.prefix = prefix
        self._last_expiry: OrderedDict[bytes, float] = OrderedDict()
        self._own: bytes | None = None  # our subkey (peer id), known from our first write

    async def _store(self, key: bytes, value: bytes, expires_at: float) -> None:
        """Our record under ``key``, expiring after every one of ours there we know of."""
        last = self._last_expiry.get(key)
        if last is not None:
            expires_at = max(expires_at, last + _EXPIRY_STEP_S)
        self._remember(key, expires_at)
        await self.dht.store(key, value, expires_at, subkey=b"")

    def _remember(self, key: bytes, expires_at: float) -> None:
        self._last_expiry[key] = max(expires_at, self._last_expiry.pop(key, expires_at))
        while len(self._last_expiry) > _REMEMBERED_KEYS:
            self._last_expiry.popitem(last=False)

    async def announce(self, key: bytes, entry: ReadyPeer, expires_at: float) -> None:
        value = msgpack.packb(
            [
                BOARD_VERSION,
                entry.weight,
                entry.uplink_bps,
                entry.downlink_bps,
                entry.client_mode,
                entry.address,
                entry.expected,
                entry.nonce,
                entry.closed,
            ]
        )
        self._own = entry.peer
        await self._store(self.prefix + key, value, expires_at)

    async def entries(self, key: bytes) -> list[ReadyPeer]:
        return list((await self._read(self.prefix + key, _parse)).values())

    async def confirm(self, key: bytes, peer: bytes, group_id: bytes, expires_at: float) -> None:
        value = msgpack.packb([BOARD_VERSION, group_id])
        self._own = peer
        await self._store(self.prefix + key + _CONFIRM, value, expires_at)

    async def confirmations(self, key: bytes) -> dict[bytes, bytes]:
        return await self._read(self.prefix + key + _CONFIRM, _parse_confirmation)

    async def _read(self, key: bytes, parse: Callable[[bytes, bytes], T | None]) -> dict[bytes, T]:
        """Subkey -> parsed value of every entry under ``key`` that parses (per subkey, the
        record the DHT keeps: the one that expires last)."""
        freshest = freshest_by_subkey(await self.dht.get_records(key))
        freshest.pop(b"", None)  # a plain value is no board entry
        own = freshest.get(self._own) if self._own is not None else None
        if own is not None:  # perhaps written by an earlier run of this peer
            self._remember(key, own.expires_at)
        parsed = {subkey: parse(subkey, r.value) for subkey, r in freshest.items()}
        return {subkey: v for subkey, v in parsed.items() if v is not None}


def _fields(subkey: bytes, value: bytes, count: int) -> list[Any] | None:
    """The ``count`` msgpack fields of a board value of this version, or None."""
    if len(subkey) != _PEER_ID_BYTES or len(value) > _MAX_VALUE_BYTES:
        return None
    try:
        fields = msgpack.unpackb(value)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None
    if not isinstance(fields, list) or len(fields) != count or fields[0] != BOARD_VERSION:
        return None
    return fields


def _parse_confirmation(subkey: bytes, value: bytes) -> bytes | None:
    fields = _fields(subkey, value, 2)
    if fields is None:
        return None
    group_id = fields[1]
    if not isinstance(group_id, bytes) or not 1 <= len(group_id) <= _MAX_GROUP_ID_BYTES:
        return None
    return group_id


def _parse(subkey: bytes, value: bytes) -> ReadyPeer | None:
    fields = _fields(subkey, value, 9)
    if fields is None:
        return None
    _, weight, uplink, downlink, client_mode, address, expected, nonce, closed = fields
    numbers_ok = all(
        isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
        for x in (weight, uplink, downlink)
    )
    if not numbers_ok or not isinstance(client_mode, bool) or not isinstance(closed, bool):
        return None
    if not isinstance(address, str) or len(address) > _MAX_ADDRESS_CHARS:
        return None
    if type(expected) is not int or not 0 <= expected <= _MAX_EXPECTED:
        return None
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        return None
    return ReadyPeer(
        subkey,
        float(weight),
        float(uplink),
        client_mode,
        address,
        expected,
        nonce,
        float(downlink),
        closed,
    )
