"""Traffic counters as the monitor sees them, and arithmetic on snapshots of them.

The transport (``shoal.net.traffic.Traffic``) counts bytes and messages per remote peer and,
separately, per service, plus call-latency histograms per method. The monitor reads them
through a :data:`TrafficProvider`: a zero-argument callable returning a cumulative
:class:`TrafficSnapshot`. For the transport's own object::

    provider = net_traffic_provider(runtime.traffic)   # anything with .snapshot() -> dict

Everything else here is pure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "EMPTY_TRAFFIC",
    "LatencyHistogram",
    "TrafficCounters",
    "TrafficProvider",
    "TrafficSnapshot",
    "from_net_snapshot",
    "net_traffic_provider",
    "traffic_delta",
]

_MAX_ENTRIES = 4096


@dataclass(frozen=True, slots=True)
class TrafficCounters:
    """Cumulative (or, after :func:`traffic_delta`, per-interval) traffic of one peer or
    service."""

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


@dataclass(frozen=True, slots=True)
class LatencyHistogram:
    """Cumulative call latencies: ``counts[i]`` calls took <= ``bounds_s[i]`` (and more than
    the previous bound); the last count is everything above the last bound."""

    bounds_s: tuple[float, ...]
    counts: tuple[int, ...]
    sum_s: float


@dataclass(frozen=True, slots=True)
class TrafficSnapshot:
    """Traffic per remote peer and per service (each message is in both tables once)."""

    peers: Mapping[str, TrafficCounters] = field(default_factory=dict)
    services: Mapping[str, TrafficCounters] = field(default_factory=dict)
    latency: Mapping[str, LatencyHistogram] = field(default_factory=dict)
    """Per ``side:method`` (e.g. ``client:/shoal.v1.DHT/FindValue``); cumulative only."""

    def total(self) -> TrafficCounters:
        out = TrafficCounters()
        for c in self.services.values():
            out = out + c
        return out

    def merged(self, other: TrafficSnapshot) -> TrafficSnapshot:
        """Sum of two interval snapshots (latency is not merged)."""
        return TrafficSnapshot(_add(self.peers, other.peers), _add(self.services, other.services))


EMPTY_TRAFFIC = TrafficSnapshot()
TrafficProvider = Callable[[], TrafficSnapshot]
_ZERO = TrafficCounters()


def _add(
    a: Mapping[str, TrafficCounters], b: Mapping[str, TrafficCounters]
) -> dict[str, TrafficCounters]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, _ZERO) + v
    return out


def _sub(after: int, before: int) -> int:
    # A counter that went down was reset (a restarted transport): count it afresh.
    return after - before if after >= before else after


def _delta(
    before: Mapping[str, TrafficCounters], after: Mapping[str, TrafficCounters]
) -> dict[str, TrafficCounters]:
    out: dict[str, TrafficCounters] = {}
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


def traffic_delta(before: TrafficSnapshot, after: TrafficSnapshot) -> TrafficSnapshot:
    """Traffic between two cumulative snapshots; entries with no traffic are left out."""
    return TrafficSnapshot(
        _delta(before.peers, after.peers), _delta(before.services, after.services)
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _counters(table: Any) -> dict[str, TrafficCounters]:
    if not isinstance(table, Mapping):
        return {}
    out = {}
    for name, c in list(table.items())[:_MAX_ENTRIES]:
        if isinstance(name, str) and isinstance(c, Mapping):
            out[name] = TrafficCounters(
                _int(c.get("bytes_out")),
                _int(c.get("bytes_in")),
                _int(c.get("messages_out")),
                _int(c.get("messages_in")),
            )
    return out


def from_net_snapshot(snapshot: Mapping[str, Any]) -> TrafficSnapshot:
    """Convert ``shoal.net.traffic.Traffic.snapshot()`` (``{"peers": {peer: {"bytes_in",
    "bytes_out", "messages_in", "messages_out"}}, "services": {...}, "latency": {key:
    {"buckets_s", "counts", "sum_s"}}}``); malformed entries are skipped."""
    latency = {}
    table = snapshot.get("latency")
    if isinstance(table, Mapping):
        for key, h in list(table.items())[:_MAX_ENTRIES]:
            if not (isinstance(key, str) and isinstance(h, Mapping)):
                continue
            bounds, counts = h.get("buckets_s"), h.get("counts")
            if (
                isinstance(bounds, (list, tuple))
                and isinstance(counts, (list, tuple))
                and len(counts) == len(bounds) + 1
            ):
                latency[key] = LatencyHistogram(
                    tuple(float(b) for b in bounds),
                    tuple(_int(c) for c in counts),
                    float(h.get("sum_s") or 0.0),
                )
    return TrafficSnapshot(
        _counters(snapshot.get("peers")), _counters(snapshot.get("services")), latency
    )


def net_traffic_provider(traffic: Any) -> TrafficProvider:
    """A provider over the transport's accounting object (anything with ``snapshot()``)."""
    return lambda: from_net_snapshot(traffic.snapshot())
