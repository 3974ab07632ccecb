"""The rendezvous board: where peers ready for a round announce themselves and confirm.

``RendezvousBoard`` is the small interface matchmaking needs: announce an entry under a
round key (one entry per peer, expiring), read all entries for a key, and post and read
each peer's confirmation. The DHT's signed records with subkeys provide it in a swarm
(``dht_board.py``); :class:`MemoryBoard` provides it in one process for tests. The rest are
the board operations :func:`~shoal.parallel.data.rendezvous.find_group` builds on: every
call bounded in time, and withdrawals (a confirmation that matches no group: this attempt
left the round) posted and read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from shoal.net.aio import within
from shoal.parallel.data.matchmaking import ReadyPeer

__all__ = ["MemoryBoard", "RendezvousBoard", "Withdrawals", "bounded", "withdraw"]

WITHDRAWN = b"\0"
"""Posted after an attempt's nonce: a confirmation that matches no group id."""
T = TypeVar("T")


class RendezvousBoard(Protocol):
    """Where ready peers meet. Entries expire at ``expires_at`` (board clock, seconds)."""

    async def announce(self, key: bytes, entry: ReadyPeer, expires_at: float) -> None: ...

    async def entries(self, key: bytes) -> list[ReadyPeer]: ...

    async def confirm(self, key: bytes, peer: bytes, group_id: bytes, expires_at: float) -> None:
        """Post the id of the group ``peer`` derived for round ``key`` (opaque bytes, at
        most 64: ``find_group`` prefixes its attempt nonce)."""
        ...

    async def confirmations(self, key: bytes) -> dict[bytes, bytes]:
        """Peer -> bytes posted by :meth:`confirm` for round ``key`` (unexpired)."""
        ...


class MemoryBoard:
    """In-process board with an injectable clock (tests, single-process swarms)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._entries: dict[bytes, dict[bytes, tuple[ReadyPeer, float]]] = {}
        self._confirmed: dict[bytes, dict[bytes, tuple[bytes, float]]] = {}

    async def announce(self, key: bytes, entry: ReadyPeer, expires_at: float) -> None:
        self._entries.setdefault(key, {})[entry.peer] = (entry, expires_at)

    async def entries(self, key: bytes) -> list[ReadyPeer]:
        now = self._clock()
        return [e for e, exp in self._entries.get(key, {}).values() if exp > now]

    async def confirm(self, key: bytes, peer: bytes, group_id: bytes, expires_at: float) -> None:
        self._confirmed.setdefault(key, {})[peer] = (group_id, expires_at)

    async def confirmations(self, key: bytes) -> dict[bytes, bytes]:
        now = self._clock()
        return {p: g for p, (g, exp) in self._confirmed.get(key, {}).items() if exp > now}


async def bounded(call: Awaitable[T], timeout_s: float) -> T | None:
    """``call``'s result, or None when it did not finish within ``timeout_s``."""
    try:
        return await within(call, max(timeout_s, 1e-3))
    except asyncio.TimeoutError:
        return None


async def withdraw(
    board: RendezvousBoard, round_key: bytes, me: ReadyPeer, expires_at: float, timeout_s: float
) -> None:
    """Post that attempt ``me`` (its nonce) takes part in no group under ``round_key``
    (within ``timeout_s``)."""
    post = board.confirm(round_key, me.peer, me.nonce + WITHDRAWN, expires_at=expires_at)
    await bounded(post, timeout_s)


class Withdrawals:
    """Which attempts seen on the board have withdrawn: read from the confirmations, once
    per entry seen (a withdrawal is final for its attempt), and only when asked (when a
    window is about to close), so an open window costs no extra reads."""

    def __init__(
        self, board: RendezvousBoard, round_key: bytes, me: ReadyPeer, timeout_s: float
    ) -> None:
        self._board, self._key, self._me, self._timeout_s = board, round_key, me, timeout_s
        self._checked: set[tuple[bytes, bytes]] = set()
        self._gone: set[tuple[bytes, bytes]] = set()

    async def others_staying(self, ready: list[ReadyPeer]) -> int:
        """How many of ``ready`` besides us have not withdrawn (at most one bounded read of
        the confirmations; when it fails, the unchecked ones count as staying)."""
        others = {(p.peer, p.nonce) for p in ready if p.peer != self._me.peer}
        unchecked = others - self._checked
        if unchecked:
            posts = await bounded(self._board.confirmations(self._key), self._timeout_s)
            if posts is not None:
                self._checked |= unchecked
                self._gone |= {
                    (peer, nonce)
                    for peer, nonce in unchecked
                    if posts.get(peer) == nonce + WITHDRAWN
                }
        return len(others - self._gone)
