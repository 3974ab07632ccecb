"""The relay: reservations of unreachable peers and circuits spliced between two streams.

An unreachable peer U calls ``Listen`` and keeps the stream open (its reservation); the
first event tells U the address the relay sees it at, later ones are keepalives or circuit
announcements. A dialer D calls ``Connect`` with U's PeerID in its first frame; the relay
creates a circuit, announces it on U's reservation, and waits up to ``accept_timeout_s`` for
U's ``Accept`` naming it. Then both streams get an ``open`` frame and payload frames are
copied between them through bounded queues, each direction held to ``rate_bytes_s`` by a
token bucket; a circuit idle for ``idle_timeout_s`` is closed. The relay never looks inside
the bytes: the authenticated gRPC session runs end to end between D and U.

``RelayCore.stats()`` exposes bytes per circuit (open and recently closed) and totals.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from shoal.errors import PeerUnavailable, ProtocolViolation
from shoal.net.aio import within
from shoal.net.identity import PeerID
from shoal.net.nat.limits import MAX_FRAME_BYTES, RelayConfig, TokenBucket
from shoal.net.proto.v1 import relay_pb2

__all__ = ["Circuit", "RelayCore"]

_CLOSED_HISTORY = 256
_EVENT_QUEUE = 32
_END = None


@dataclass(slots=True)
class Circuit:
    id: int
    dialer: PeerID
    target: PeerID
    to_target: asyncio.Queue[bytes | None]
    to_dialer: asyncio.Queue[bytes | None]
    bucket_to_target: TokenBucket
    bucket_to_dialer: TokenBucket
    last_active_s: float
    accepted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    bytes_to_target: int = 0
    bytes_to_dialer: int = 0
    closed: bool = False

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "dialer": self.dialer.raw.hex(),
            "target": self.target.raw.hex(),
            "bytes_to_target": self.bytes_to_target,
            "bytes_to_dialer": self.bytes_to_dialer,
            "open": not self.closed,
        }


@dataclass(slots=True)
class _Reservation:
    peer: PeerID
    events: asyncio.Queue[relay_pb2.RelayEvent | None]
    circuits: set[int] = field(default_factory=set)


def observed_address(peer: str) -> str:
    """``ip:port`` from a gRPC ``context.peer()`` string (``ipv4:1.2.3.4:5``), else ``""``."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest
    if kind == "ipv6":
        return rest.replace("%5B", "[").replace("%5D", "]")
    return ""


class RelayCore:
    """Reservations and circuits of one relay; the handlers are called by the Relay service."""

    def __init__(self, config: RelayConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._reservations: dict[bytes, _Reservation] = {}
        self._circuits: dict[int, Circuit] = {}
        self._closed: deque[dict[str, Any]] = deque(maxlen=_CLOSED_HISTORY)
        self._ids = itertools.count(1)
        self.total_bytes = 0
        self.refused = 0

    # -- accounting ----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Reservations, circuits (open, then recently closed) and total relayed bytes."""
        return {
            "reservations": [r.peer.raw.hex() for r in self._reservations.values()],
            "circuits": [c.summary() for c in self._circuits.values()] + list(self._closed),
            "total_bytes": self.total_bytes,
            "refused": self.refused,
        }

    def _refuse(self, message: str) -> PeerUnavailable:
        self.refused += 1
        return PeerUnavailable(message)

    # -- Listen ---------------------------------------------------------------------------
    async def listen(self, peer: PeerID, observed: str) -> AsyncIterator[relay_pb2.RelayEvent]:
        cfg = self.config
        old = self._reservations.get(peer.raw)
        if old is None and len(self._reservations) >= cfg.max_reservations:
            raise self._refuse(f"relay has {cfg.max_reservations} reservations")
        if old is not None:
            old.events.put_nowait(_END) if not old.events.full() else None
        mine = _Reservation(peer, asyncio.Queue(_EVENT_QUEUE))
        self._reservations[peer.raw] = mine
        try:
            yield relay_pb2.RelayEvent(circuit_id=0, observed=observed)
            while True:
                try:
                    event = await within(mine.events.get(), cfg.keepalive_s)
                except asyncio.TimeoutError:
                    event = relay_pb2.RelayEvent(circuit_id=0)
                if event is _END:
                    return
                yield event
        finally:
            if self._reservations.get(peer.raw) is mine:
                del self._reservations[peer.raw]
            for cid in list(mine.circuits):
                circuit = self._circuits.get(cid)
                if circuit is not None and not circuit.accepted.done():
                    circuit.accepted.set_exception(PeerUnavailable("target left the relay"))

    # -- Connect / Accept -----------------------------------------------------------------
    async def connect(
        self, dialer: PeerID, requests: AsyncIterator[Any]
    ) -> AsyncIterator[relay_pb2.RelayFrame]:
        cfg = self.config
        first = await _first(requests, cfg.accept_timeout_s)
        if len(first.target) != 32:
            raise ProtocolViolation("Connect: the first frame must name a 32-byte target")
        target = PeerID(first.target)
        reservation = self._reservations.get(target.raw)
        if reservation is None:
            raise self._refuse("target has no reservation here")
        if len(self._circuits) >= cfg.max_circuits:
            raise self._refuse(f"relay has {cfg.max_circuits} open circuits")
        if len(reservation.circuits) >= cfg.max_circuits_per_peer:
            raise self._refuse(f"target has {cfg.max_circuits_per_peer} open circuits")
        if reservation.events.full():
            raise self._refuse("target is not taking circuits")
        now = self._clock()
        circuit = Circuit(
            id=next(self._ids),
            dialer=dialer,
            target=target,
            to_target=asyncio.Queue(cfg.queue_frames),
            to_dialer=asyncio.Queue(cfg.queue_frames),
            bucket_to_target=TokenBucket(cfg.rate_bytes_s, cfg.burst_bytes, now),
            bucket_to_dialer=TokenBucket(cfg.rate_bytes_s, cfg.burst_bytes, now),
            last_active_s=now,
        )
        self._circuits[circuit.id] = circuit
        reservation.circuits.add(circuit.id)
        reservation.events.put_nowait(
            relay_pb2.RelayEvent(circuit_id=circuit.id, dialer=dialer.raw)
        )
        try:
            try:
                await within(asyncio.shield(circuit.accepted), cfg.accept_timeout_s)
            except asyncio.TimeoutError:
                raise self._refuse("target did not accept the circuit in time") from None
            async for frame in self._carry(circuit, requests, toward_target=True):
                yield frame
        finally:
            reservation.circuits.discard(circuit.id)
            self._close(circuit)

    async def accept(
        self, target: PeerID, requests: AsyncIterator[Any]
    ) -> AsyncIterator[relay_pb2.RelayFrame]:
        first = await _first(requests, self.config.accept_timeout_s)
        circuit = self._circuits.get(first.circuit_id)
        if circuit is None or circuit.target != target or circuit.accepted.done():
            raise self._refuse("no such circuit waiting for this peer")
        circuit.accepted.set_result(None)
        try:
            async for frame in self._carry(circuit, requests, toward_target=False):
                yield frame
        finally:
            self._close(circuit)

    async def _carry(
        self, circuit: Circuit, requests: AsyncIterator[Any], *, toward_target: bool
    ) -> AsyncIterator[relay_pb2.RelayFrame]:
        """Pump ``requests`` to the other side in a task; yield what the other side sends."""
        inbox = circuit.to_dialer if toward_target else circuit.to_target
        pump = asyncio.get_running_loop().create_task(
            self._pump(circuit, requests, toward_target=toward_target)
        )
        try:
            yield relay_pb2.RelayFrame(open=True)
            tick = min(1.0, self.config.idle_timeout_s)
            while not circuit.closed:
                try:
                    data = await within(inbox.get(), tick)
                except asyncio.TimeoutError:
                    if self._clock() - circuit.last_active_s > self.config.idle_timeout_s:
                        return
                    continue
                if data is _END:
                    return
                yield relay_pb2.RelayFrame(data=data)
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump

    async def _pump(
        self, circuit: Circuit, requests: AsyncIterator[Any], *, toward_target: bool
    ) -> None:
        outbox = circuit.to_target if toward_target else circuit.to_dialer
        bucket = circuit.bucket_to_target if toward_target else circuit.bucket_to_dialer
        try:
            async for frame in requests:
                data = frame.data
                if len(data) > MAX_FRAME_BYTES:
                    raise ProtocolViolation(f"relay frame of {len(data)} bytes")
                if not data:
                    continue
                delay = bucket.delay_s(len(data), self._clock())
                if delay > 0:
                    await asyncio.sleep(delay)  # rate limit, not synchronisation
                await outbox.put(data)
                n = len(data)
                if toward_target:
                    circuit.bytes_to_target += n
                else:
                    circuit.bytes_to_dialer += n
                self.total_bytes += n
                circuit.last_active_s = self._clock()
        finally:
            if not circuit.closed:
                with contextlib.suppress(asyncio.QueueFull):
                    outbox.put_nowait(_END)

    def _close(self, circuit: Circuit) -> None:
        if circuit.closed:
            return
        circuit.closed = True
        for queue in (circuit.to_target, circuit.to_dialer):
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(_END)
        if not circuit.accepted.done():
            circuit.accepted.cancel()
        self._circuits.pop(circuit.id, None)
        self._closed.append(circuit.summary())


async def _first(requests: AsyncIterator[Any], timeout_s: float) -> Any:
    try:
        return await within(requests.__anext__(), timeout_s)
    except (StopAsyncIteration, asyncio.TimeoutError):
        raise ProtocolViolation("relay stream ended before its first frame") from None
