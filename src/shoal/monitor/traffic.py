"""Traffic counters as the monitor sees them, and arithmetic on snapshots of them.

The transport counts bytes and messages per (remote peer, service). The monitor does not
import it: a peer passes a :data:`TrafficProvider`, a zero-argument callable returning the
*cumulative* counters at that moment, e.g.::

    provider = lambda: {(p, s): TrafficCounters(c.bytes_sent, c.bytes_received,
                                                c.messages_sent, c.messages_received)
                        for (p, s), c in transport.traffic().items()}

Everything here is pure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = [
    "TrafficCounters",
    "TrafficKey",
    "TrafficProvider",
    "TrafficSnapshot",
    "by_peer",
    "by_service",
    "traffic_delta",
    "traffic_total",
]

TrafficKey = tuple[str, str]
"""(remote peer id in text form, service name)."""


@dataclass(frozen=True, slots=True)
class TrafficCounters:
    """Cumulative (or, after :func:`traffic_delta`, per-interval) traffic of one key."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0

    def __add__(self, other: TrafficCounters) -> TrafficCounters:
        return TrafficCounters(
            self.bytes_sent + other.bytes_sent,
            self.bytes_received + other.bytes_received,
            self.messages_sent + other.messages_sent,
            self.messages_received + other.messages_received,
        )


TrafficSnapshot = Mapping[TrafficKey, TrafficCounters]
TrafficProvider = Callable[[], TrafficSnapshot]

_ZERO = TrafficCounters()


def _sub(after: int, before: int) -> int:
    # A counter that went down was reset (a reconnect, a restarted transport): count it afresh.
    return after - before if after >= before else after


def traffic_delta(
    before: TrafficSnapshot, after: TrafficSnapshot
) -> dict[TrafficKey, TrafficCounters]:
    """Traffic between two cumulative snapshots; keys with no traffic are left out."""
    out: dict[TrafficKey, TrafficCounters] = {}
    for key, a in after.items():
        b = before.get(key, _ZERO)
        d = TrafficCounters(
            _sub(a.bytes_sent, b.bytes_sent),
            _sub(a.bytes_received, b.bytes_received),
            _sub(a.messages_sent, b.messages_sent),
            _sub(a.messages_received, b.messages_received),
        )
        if d != _ZERO:
            out[key] = d
    return out


def _group(snapshot: TrafficSnapshot, index: int) -> dict[str, TrafficCounters]:
    out: dict[str, TrafficCounters] = {}
    for key, counters in snapshot.items():
        name = key[index]
        out[name] = out.get(name, _ZERO) + counters
    return out


def by_peer(snapshot: TrafficSnapshot) -> dict[str, TrafficCounters]:
    return _group(snapshot, 0)


def by_service(snapshot: TrafficSnapshot) -> dict[str, TrafficCounters]:
    return _group(snapshot, 1)


def traffic_total(snapshot: TrafficSnapshot) -> TrafficCounters:
    total = _ZERO
    for counters in snapshot.values():
        total = total + counters
    return total
