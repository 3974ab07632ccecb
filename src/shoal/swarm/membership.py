"""``Membership``: heartbeat our signed PeerInfo into the DHT and keep a live view of peers.

Each peer stores its encoded ``PeerInfo`` as the subkey it owns (its PeerID) of a swarm-wide
DHT key, with ``expires_at = now + ttl_s``; the DHT signs it and refuses anyone else's
writes to that subkey. Peers are spread over ``shards`` keys by PeerID so that one key
stays within what one DHT answer carries. Every ``refresh_interval_s`` the view re-reads all
shards and merges them into a ``MembershipView`` (pure; see ``view.py``).

Works with anything that has ``DHTNode``'s ``identity``, ``store`` and ``get_records``.
Runs on the network loop; ``start`` spawns one owned task, ``close`` cancels it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from shoal.dht.record import Record
from shoal.errors import NetworkError, ProtocolViolation
from shoal.net.aio import within
from shoal.net.identity import Identity, PeerID
from shoal.net.tasks import TaskSet
from shoal.swarm.config import SwarmConfig
from shoal.swarm.peerinfo import PeerInfo, decode_peer_info, encode_peer_info
from shoal.swarm.view import Member, MembershipView

__all__ = ["Membership", "swarm_keys"]

_log = logging.getLogger(__name__)


class DHTLike(Protocol):
    identity: Identity

    async def store(
        self, key: bytes, value: bytes, expires_at: float, subkey: bytes | None = None
    ) -> int: ...

    async def get_records(self, key: bytes, *, quorum: int | None = None) -> list[Record]: ...


def swarm_keys(config: SwarmConfig) -> list[bytes]:
    """The DHT keys that hold the swarm's heartbeats, one per shard."""
    base = f"shoal/v1/swarm/{config.swarm}/peers/".encode()
    return [base + str(i).encode() for i in range(int(config.shards))]


def _shard_of(peer: PeerID, shards: int) -> int:
    return peer.digest()[0] % shards


class Membership:
    """Announces this peer and tracks the others."""

    def __init__(
        self,
        dht: DHTLike,
        config: SwarmConfig,
        info: Callable[[], PeerInfo],
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.dht = dht
        self.config = config
        self.info = info
        self.wall_clock = wall_clock
        self.view = MembershipView(ttl_s=config.ttl_s, max_clock_skew_s=config.max_clock_skew_s)
        self._keys = swarm_keys(config)
        self._tasks = TaskSet("swarm membership", failure_log_level=logging.WARNING)
        self._beating = True

    def peers(self) -> list[Member]:
        """Live peers (ourselves included once our first heartbeat was read back)."""
        return self.view.live(self.wall_clock())

    async def heartbeat(self) -> int:
        """Store our PeerInfo once; returns how many DHT replicas accepted it."""
        me = self.dht.identity.peer_id
        key = self._keys[_shard_of(me, len(self._keys))]
        expires_at = self.wall_clock() + self.config.ttl_s
        value = encode_peer_info(self.info())
        return await within(
            self.dht.store(key, value, expires_at, subkey=b""), self.config.timeout_s
        )

    async def refresh(self) -> int:
        """Re-read every shard into the view; returns the number of live peers."""
        answers = await within(
            asyncio.gather(*(self.dht.get_records(k) for k in self._keys), return_exceptions=True),
            self.config.timeout_s,
        )
        now = self.wall_clock()
        beats = []
        for answer in answers:
            if isinstance(answer, BaseException):
                if not isinstance(answer, NetworkError):
                    raise answer
                continue
            for record in answer:
                if record.subkey != record.writer.raw:
                    continue  # only the owner's plain subkey is a heartbeat
                try:
                    beats.append((record.writer, decode_peer_info(record.value), record.expires_at))
                except ProtocolViolation as exc:
                    _log.info(
                        "ignoring malformed heartbeat from %s: %s", record.writer.short(), exc
                    )
        self.view.update(beats, now)
        return len(self.view.live(now))

    def start(self) -> None:
        """Start heartbeating and refreshing (on the network loop)."""
        if not self._tasks.closed:
            self._tasks.spawn(self._run())

    def stop_heartbeats(self) -> None:
        """Keep watching but stop announcing (used before leaving, and by tests)."""
        self._beating = False

    async def close(self) -> None:
        await self._tasks.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        next_beat = next_refresh = loop.time()
        while True:
            now = loop.time()
            if self._beating and now >= next_beat:
                next_beat = now + cfg.heartbeat_interval_s
                with contextlib.suppress(NetworkError, asyncio.TimeoutError):
                    await self.heartbeat()
            if now >= next_refresh:
                next_refresh = now + cfg.refresh_interval_s
                with contextlib.suppress(NetworkError, asyncio.TimeoutError):
                    await self.refresh()
            wake = min(next_refresh, next_beat if self._beating else next_refresh)
            await asyncio.sleep(max(0.0, wake - loop.time()))
