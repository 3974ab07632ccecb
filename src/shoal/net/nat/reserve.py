"""Keeping reservations at relays, and accepting the circuits they announce.

``Reserver`` holds up to ``wanted`` reservations (``Relay.Listen`` streams) among candidate
relays, best first. When a stream ends or stays silent for ``silence_s`` (the relay sends
keepalives), the relay is put on hold for ``retry_s`` and the next candidate is tried at
once, so a dead relay is replaced within about one connect timeout. Every announced circuit
is accepted with ``Relay.Accept`` and bridged into this peer's gRPC server (its unix socket).
``on_change(relays)`` is called whenever the set of held reservations changes (to
re-advertise "reachable via" in the DHT).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from shoal.errors import ConfigError, NetworkError
from shoal.net.aio import within
from shoal.net.identity import PeerID
from shoal.net.nat.bridge import bridge_to_unix
from shoal.net.nat.circuit import open_circuit
from shoal.net.proto.v1 import relay_pb2, relay_pb2_grpc
from shoal.net.runtime import NetRuntime
from shoal.net.tasks import TaskSet

__all__ = ["RelayAddress", "Reserver", "ReserverConfig"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RelayAddress:
    address: str
    peer_id: PeerID | None = None


@dataclass(kw_only=True, slots=True)
class ReserverConfig:
    wanted: int = 1
    """Reservations held at once."""
    silence_s: float = 40.0
    """A reservation stream with no event for this long is given up (relay keepalive < it)."""
    retry_s: float = 5.0
    """A relay that failed is not tried again for this long."""
    open_timeout_s: float = 5.0
    """Deadline for a relay to accept a reservation or a circuit."""
    circuit_lifetime_s: float = 24 * 3600.0
    """Longest life of one accepted circuit."""
    idle_check_s: float = 0.5
    """How often a missing reservation is looked for when all candidates are on hold."""

    def __post_init__(self) -> None:
        if not isinstance(self.wanted, int) or not 1 <= self.wanted <= 8:
            raise ConfigError(f"ReserverConfig.wanted must be in [1, 8], got {self.wanted!r}")
        for name in (
            "silence_s",
            "retry_s",
            "open_timeout_s",
            "circuit_lifetime_s",
            "idle_check_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"ReserverConfig.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(slots=True)
class _Slot:
    relay: RelayAddress
    observed: str = ""
    task: asyncio.Task[None] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class Reserver:
    def __init__(
        self,
        runtime: NetRuntime,
        candidates: list[RelayAddress],
        config: ReserverConfig | None = None,
        on_change: Callable[[list[RelayAddress]], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.candidates = list(candidates)
        self.config = config or ReserverConfig()
        self.on_change = on_change
        self._slots: dict[str, _Slot] = {}
        self._hold_until: dict[str, float] = {}
        self._tasks = TaskSet("reserver", runtime.spawn)
        self._wake = asyncio.Event()
        self.accepted = 0
        self.changed = asyncio.Event()
        """Set at every change of the held reservations (tests and callers clear it)."""

    def held(self) -> list[RelayAddress]:
        """Relays that currently hold a reservation for us (confirmed by the relay)."""
        return [s.relay for s in self._slots.values() if s.ready.is_set()]

    def observed(self) -> list[str]:
        """Addresses the relays see us at."""
        return [s.observed for s in self._slots.values() if s.observed]

    def start(self) -> None:
        self._tasks.spawn(self._keep(), name="reserver")

    async def close(self) -> None:
        await self._tasks.close()

    async def wait_held(self, count: int, timeout_s: float) -> list[RelayAddress]:
        """Wait until ``count`` reservations are held; PeerTimeout-like TimeoutError else."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(self.held()) < count:
            self.changed.clear()
            left = deadline - loop.time()
            if left <= 0:
                raise asyncio.TimeoutError(f"{len(self.held())} of {count} reservations held")
            with contextlib.suppress(asyncio.TimeoutError):
                await within(self.changed.wait(), left)
        return self.held()

    # -- the keeper loop ------------------------------------------------------------------
    async def _keep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            for relay in self.candidates:
                if len(self._slots) >= self.config.wanted:
                    break
                if relay.address in self._slots or self._hold_until.get(relay.address, 0) > now:
                    continue
                slot = self._slots[relay.address] = _Slot(relay)
                slot.task = self._tasks.spawn(self._hold(slot), name=f"reserve-{relay.address}")
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await within(self._wake.wait(), self.config.idle_check_s)

    async def _hold(self, slot: _Slot) -> None:
        cfg = self.config
        relay = slot.relay
        stub = self.runtime.stub(relay_pb2_grpc.RelayStub, relay.address, relay.peer_id)
        events = stub.Listen(relay_pb2.ListenRequest(), timeout_s=cfg.circuit_lifetime_s)
        try:
            first = True
            while True:
                timeout = cfg.open_timeout_s if first else cfg.silence_s
                event = await within(events.__anext__(), timeout)
                if first:
                    first = False
                    if relay.peer_id is None and stub.peer_id is not None:
                        slot.relay = RelayAddress(relay.address, stub.peer_id)  # learned
                    slot.observed = event.observed
                    slot.ready.set()
                    self._changed()
                if event.circuit_id:
                    self._tasks.spawn(self._accept(stub, event.circuit_id), name="relay-accept")
        except (NetworkError, asyncio.TimeoutError, StopAsyncIteration) as exc:
            _log.info("reservation at %s ended: %r", relay.address, exc)
        finally:
            with contextlib.suppress(Exception):
                await events.aclose()
            self._hold_until[relay.address] = asyncio.get_running_loop().time() + cfg.retry_s
            was_ready = slot.ready.is_set()
            if self._slots.get(relay.address) is slot:
                del self._slots[relay.address]
            self._wake.set()
            if was_ready:
                self._changed()

    def _changed(self) -> None:
        self.changed.set()
        if self.on_change is not None:
            self.on_change(self.held())

    async def _accept(self, stub: object, circuit_id: int) -> None:
        unix_path = self.runtime.unix_path
        if unix_path is None:
            return
        try:
            link = await open_circuit(
                stub.Accept,  # type: ignore[attr-defined]
                relay_pb2.RelayFrame(circuit_id=circuit_id),
                tasks=self._tasks,
                open_timeout_s=self.config.open_timeout_s,
                lifetime_s=self.config.circuit_lifetime_s,
            )
        except NetworkError as exc:
            _log.info("circuit %d not accepted: %r", circuit_id, exc)
            return
        self.accepted += 1
        await bridge_to_unix(link, unix_path)
