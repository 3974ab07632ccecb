"""Moving summaries between peers: the store interface, its DHT binding, and the publisher.

A :class:`SummaryStore` has two coroutines: ``publish(summary)`` puts this peer's summary
where others can read it, ``fetch()`` returns every summary currently readable. Bindings:

- :class:`DhtSummaryStore`: the keys ``shoal/v1/swarm/<swarm>/monitor/<shard>`` (peers
  spread over ``shards`` keys by a hash of their id), one subkey per peer (``shoal.dht``
  prefixes the subkey with the writer's PeerID and verifies the signature, so each peer can
  only overwrite its own entry); records expire after ``record_ttl_s``. ``fetch`` reads all
  shards concurrently.
  Binds to ``shoal.dht.DHTNode`` (``store``/``get``) or anything with the same two methods.
- :class:`MemorySummaryStore`: a dict, for tests and for observers in the same process.

:class:`SummaryPublisher` owns one background task on the network loop that publishes this
peer's summary every ``publish_interval_s`` (with jitter), each publish under a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from shoal.errors import NetworkError, ProtocolViolation
from shoal.monitor.config import SwarmViewConfig
from shoal.monitor.summary import PeerSummary, decode_summary, encode_summary
from shoal.net.aio import within
from shoal.net.identity import PEER_ID_BYTES, PeerID

__all__ = [
    "DhtLike",
    "DhtSummaryStore",
    "MemorySummaryStore",
    "SummaryPublisher",
    "SummaryStore",
    "monitor_keys",
    "shard_of",
]

_MAX_RECORDS = 4096
log = logging.getLogger(__name__)


def monitor_keys(config: SwarmViewConfig) -> list[bytes]:
    """The DHT keys holding the swarm's summaries, one per shard."""
    base = f"shoal/v1/swarm/{config.swarm}/monitor/".encode()
    return [base + str(i).encode() for i in range(config.shards)]


def shard_of(peer: str, shards: int) -> int:
    """The shard a peer publishes to (stable across processes)."""
    return hashlib.sha256(peer.encode()).digest()[0] % shards


class SummaryStore(Protocol):
    async def publish(self, summary: PeerSummary) -> None: ...

    async def fetch(self) -> list[PeerSummary]: ...


class DhtLike(Protocol):
    """The part of ``shoal.dht`` this module uses."""

    async def store(self, key: Any, value: bytes, expires_at: float, subkey: Any = None) -> Any: ...

    async def get(self, key: Any) -> Any: ...


def _record_values(result: Any) -> list[tuple[Any, Any]]:
    """``(subkey or None, raw value)`` pairs of a DHT ``get`` result: nothing, one value, a
    mapping subkey -> value or record, a record whose value is such a mapping, or a sequence
    of records."""
    if result is None:
        return []
    if isinstance(result, (bytes, bytearray)):
        return [(None, bytes(result))]
    if isinstance(result, Mapping):
        return [(k, getattr(v, "value", v)) for k, v in list(result.items())[:_MAX_RECORDS]]
    if hasattr(result, "value"):
        return _record_values(result.value)
    if isinstance(result, (list, tuple)):
        return [(getattr(r, "subkey", None), getattr(r, "value", r)) for r in result[:_MAX_RECORDS]]
    return []


def _owner_text(subkey: Any) -> str | None:
    """The text PeerID that owns a ``shoal.dht`` subkey (its first 32 bytes), if any."""
    if isinstance(subkey, (bytes, bytearray)) and len(subkey) >= PEER_ID_BYTES:
        return PeerID(bytes(subkey[:PEER_ID_BYTES])).to_string()
    return None


class DhtSummaryStore:
    """Summaries under one DHT key, one subkey per peer.

    With ``bind_owner`` (the default), a fetched summary is kept only if its ``peer`` is the
    PeerID that owns (and, in ``shoal.dht``, signed) its subkey, so no peer can speak for
    another.
    """

    def __init__(
        self,
        dht: DhtLike,
        *,
        config: SwarmViewConfig,
        subkey: Any = b"",
        bind_owner: bool = True,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._dht = dht
        self._subkey = subkey
        self._config = config
        self._keys = monitor_keys(config)
        self._bind_owner = bind_owner
        self._clock = wall_clock

    async def publish(self, summary: PeerSummary) -> None:
        expires_at = self._clock() + self._config.record_ttl_s
        key = self._keys[shard_of(summary.peer, len(self._keys))]
        await self._dht.store(key, encode_summary(summary), expires_at, subkey=self._subkey)

    async def fetch(self) -> list[PeerSummary]:
        """Every valid summary of every shard. Raises the first NetworkError only when no
        shard could be read."""
        answers = await asyncio.gather(
            *(self._dht.get(k) for k in self._keys), return_exceptions=True
        )
        failures = [a for a in answers if isinstance(a, BaseException)]
        for a in failures:
            if not isinstance(a, NetworkError):
                raise a
        if failures and len(failures) == len(answers):
            raise failures[0]
        out = []
        pairs = [p for a in answers if not isinstance(a, BaseException) for p in _record_values(a)]
        for subkey, value in pairs:
            try:
                summary = decode_summary(value)
            except ProtocolViolation as exc:
                log.debug("dropping malformed summary: %s", exc)
                continue
            if self._bind_owner and _owner_text(subkey) != summary.peer:
                log.debug("dropping summary for %s not written by it", summary.peer[:12])
                continue
            out.append(summary)
        return out


class MemorySummaryStore:
    """An in-process store; publishes are encoded and decoded like the real wire."""

    def __init__(self) -> None:
        self.records: dict[str, bytes] = {}

    async def publish(self, summary: PeerSummary) -> None:
        self.records[summary.peer] = encode_summary(summary)

    async def fetch(self) -> list[PeerSummary]:
        return [decode_summary(v) for v in self.records.values()]


class SummaryPublisher:
    """Publishes ``make_summary()`` periodically until closed. Use as ``async with``.

    ``make_summary`` runs in a worker thread (``PeerMonitor.snapshot`` appends to the event
    log). With ``publish=None`` the summaries are only made (and so logged): a peer without
    a DHT still feeds ``shoal monitor --events``.
    """

    def __init__(
        self,
        make_summary: Callable[[], PeerSummary],
        publish: Callable[[PeerSummary], Awaitable[None]] | None,
        config: SwarmViewConfig,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._make = make_summary
        self._publish = publish
        self._config = config
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None
        self.published = 0
        self.failed = 0

    async def publish_once(self) -> bool:
        """One publish under ``publish_timeout_s``; True when it succeeded."""
        try:
            summary = await asyncio.to_thread(self._make)
            if self._publish is not None:
                await within(self._publish(summary), self._config.publish_timeout_s)
        except (NetworkError, asyncio.TimeoutError, OSError) as exc:
            self.failed += 1
            log.info("summary publish failed: %s", exc)
            return False
        self.published += 1
        return True

    async def _run(self) -> None:
        while True:
            await self.publish_once()
            jitter = self._rng.uniform(0.9, 1.1)
            await asyncio.sleep(self._config.publish_interval_s * jitter)

    def start(self) -> None:
        """Start the background task on the running loop. Idempotent."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="shoal-monitor-publish"
            )

    async def astart(self) -> None:
        """:meth:`start` as a coroutine, for ``runtime.run(publisher.astart(), timeout_s=5)``
        from a thread that is not the network loop."""
        self.start()

    async def aclose(self, timeout_s: float = 2.0) -> None:
        """Cancel the task and wait for it (bounded). Safe to call twice."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await within(task, timeout_s)

    async def __aenter__(self) -> SummaryPublisher:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
