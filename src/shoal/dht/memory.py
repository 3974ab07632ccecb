"""An in-memory network for the DHT: simulated latency and loss, deterministic per seed.

Thousands of nodes share one event loop (pair it with ``virtual_loop`` to simulate hours
in seconds). Each RPC is a request and an answer, each delayed by ``latency_s`` plus
uniform jitter and each lost with probability ``loss_rate``; a lost message, or a call to
an address nobody listens on (a dead node), costs the caller its full RPC deadline and
ends in ``PeerTimeout``, the worst case of a real network. A handler that runs still has
its effect even if the answer is lost, as on a real network.

With ``serialize=True`` every record crosses as bytes through ``encode_record`` /
``decode_record``, so tests exercise the wire codec; the benchmark leaves it off to share
immutable record objects between nodes and keep memory per node honest to the protocol.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from shoal.dht.ids import Contact
from shoal.dht.record import Record, decode_record, encode_record
from shoal.dht.transport import DHTHandler, FindValueAnswer, StoreAnswer
from shoal.errors import ConfigError, PeerTimeout, PeerUnavailable

__all__ = ["MemoryNetwork", "MemoryTransport", "SimConfig"]


@dataclass(frozen=True, kw_only=True, slots=True)
class SimConfig:
    """Behaviour of the simulated links."""

    latency_s: float = 0.04
    """Base one-way delay of each message."""
    jitter_s: float = 0.04
    """Extra one-way delay, uniform in [0, jitter_s]."""
    loss_rate: float = 0.0
    """Probability that one message (request or answer) is lost."""
    serialize: bool = False
    """Round-trip records through the wire codec."""

    def __post_init__(self) -> None:
        for name in ("latency_s", "jitter_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"SimConfig.{name} must be >= 0, got {value!r}")
        if not 0 <= self.loss_rate < 1:
            raise ConfigError(f"SimConfig.loss_rate must be in [0, 1), got {self.loss_rate!r}")


class MemoryNetwork:
    """Addresses -> handlers, plus the random source that decides delays and losses."""

    def __init__(self, config: SimConfig | None = None, *, seed: int = 0) -> None:
        self.config = config or SimConfig()
        self.rng = random.Random(seed)
        self._handlers: dict[str, tuple[Contact, DHTHandler]] = {}
        self.rpcs = 0
        self.calls: Counter[str] = Counter()
        """RPCs sent, by method."""
        self.lost = 0

    def listen(self, contact: Contact, handler: DHTHandler) -> None:
        if contact.address in self._handlers:
            raise ConfigError(f"simulated address {contact.address!r} already in use")
        self._handlers[contact.address] = (contact, handler)

    def unlisten(self, address: str) -> None:
        """The node at ``address`` vanishes: later calls to it time out."""
        self._handlers.pop(address, None)

    def is_listening(self, address: str) -> bool:
        return address in self._handlers

    def transport(self, own: Contact | None) -> MemoryTransport:
        """A client for the node ``own`` (None: an anonymous client that serves nothing)."""
        return MemoryTransport(self, own)

    def _delay(self) -> float | None:
        """One-way delay of one message, or None when it is lost."""
        cfg = self.config
        if cfg.loss_rate and self.rng.random() < cfg.loss_rate:
            self.lost += 1
            return None
        return cfg.latency_s + self.rng.random() * cfg.jitter_s

    def _records(self, records: Sequence[Record]) -> list[Record]:
        if not self.config.serialize:
            return list(records)
        return [decode_record(encode_record(r)) for r in records]


class MemoryTransport:
    """``DHTTransport`` over a ``MemoryNetwork``."""

    def __init__(self, network: MemoryNetwork, own: Contact | None) -> None:
        self._net = network
        self._own = own

    async def _call(
        self, address: str, expected: Contact | None, method: str, arg: object, timeout_s: float
    ) -> object:
        net = self._net
        net.rpcs += 1
        net.calls[method] += 1
        there = net._delay()
        back = net._delay()
        if there is None or there > timeout_s:
            await asyncio.sleep(timeout_s)
            raise PeerTimeout("no answer within deadline", peer=address)
        await asyncio.sleep(there)
        entry = net._handlers.get(address)
        if entry is None:
            await asyncio.sleep(timeout_s - there)
            raise PeerTimeout("no answer within deadline", peer=address)
        contact, handler = entry
        if expected is not None and contact.peer_id != expected.peer_id:
            await asyncio.sleep(min(there, timeout_s - there))
            raise PeerUnavailable("a different peer answers at this address", peer=address)
        if method == "store":
            arg = net._records(arg)  # type: ignore[arg-type]
        result = (
            getattr(handler, f"handle_{method}")(self._own, arg)
            if method != "ping"
            else handler.handle_ping(self._own)
        )
        if back is None or there + back > timeout_s:
            await asyncio.sleep(timeout_s - there)
            raise PeerTimeout("no answer within deadline", peer=address)
        await asyncio.sleep(back)
        if isinstance(result, FindValueAnswer) and net.config.serialize:
            result = FindValueAnswer(net._records(result.records), result.closer)
        return result

    async def ping(self, peer: Contact, *, timeout_s: float) -> Contact:
        return cast(Contact, await self._call(peer.address, peer, "ping", None, timeout_s))

    async def ping_address(self, address: str, *, timeout_s: float) -> Contact:
        return cast(Contact, await self._call(address, None, "ping", None, timeout_s))

    async def store(
        self, peer: Contact, records: Sequence[Record], *, timeout_s: float
    ) -> StoreAnswer:
        return cast(StoreAnswer, await self._call(peer.address, peer, "store", records, timeout_s))

    async def find_node(self, peer: Contact, target: int, *, timeout_s: float) -> list[Contact]:
        return cast(
            list[Contact], await self._call(peer.address, peer, "find_node", target, timeout_s)
        )

    async def find_value(
        self, peer: Contact, location: int, *, timeout_s: float
    ) -> FindValueAnswer:
        return cast(
            FindValueAnswer, await self._call(peer.address, peer, "find_value", location, timeout_s)
        )
