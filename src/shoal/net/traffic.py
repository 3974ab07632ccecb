"""Traffic accounting: bytes and messages per peer and per service, and call latencies.

Counted where messages are (de)serialized, so the numbers are exact payload bytes (gRPC
framing and HTTP/2 headers excluded). Updated on the network loop; ``snapshot()`` may be
called from any thread (the monitor).
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Any

# Latency buckets: upper bounds in seconds, 25 us .. ~105 s, factor 2.
BUCKETS_S: tuple[float, ...] = tuple(25e-6 * 2**i for i in range(23))
OTHER_PEER = "other"


@dataclass(slots=True)
class Counter:
    bytes_in: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    messages_out: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
        }


@dataclass(slots=True)
class Histogram:
    """Counts per latency bucket (the last bucket catches everything above)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_S) + 1))
    total: int = 0
    sum_s: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS_S, seconds)] += 1
        self.total += 1
        self.sum_s += seconds

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile ``q`` (None when empty)."""
        if self.total == 0:
            return None
        rank = q * self.total
        seen = 0
        for i, count in enumerate(self.counts):
            seen += count
            if seen >= rank and count:
                return BUCKETS_S[min(i, len(BUCKETS_S) - 1)]
        return BUCKETS_S[-1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.total,
            "sum_s": self.sum_s,
            "p50_s": self.quantile(0.5),
            "p90_s": self.quantile(0.9),
            "p99_s": self.quantile(0.99),
            "buckets_s": list(BUCKETS_S),
            "counts": list(self.counts),
        }


def service_of(method: str) -> str:
    """``/shoal.v1.Peer/Ping`` -> ``shoal.v1.Peer``."""
    return method.rsplit("/", 2)[-2] if method.count("/") >= 2 else method


class Traffic:
    """Per-peer and per-service counters plus per-method latency histograms."""

    def __init__(self, max_peers: int = 1024) -> None:
        self._lock = threading.Lock()
        self._max_peers = max_peers
        self._peers: dict[str, Counter] = {}
        self._services: dict[str, Counter] = {}
        self._latency: dict[str, Histogram] = {}

    def _peer(self, peer: str | None) -> Counter:
        key = peer or "unknown"
        counter = self._peers.get(key)
        if counter is None:
            if len(self._peers) >= self._max_peers:
                key = OTHER_PEER
            counter = self._peers.setdefault(key, Counter())
        return counter

    def _service(self, method: str) -> Counter:
        service = service_of(method)
        counter = self._services.get(service)
        if counter is None:
            counter = self._services.setdefault(service, Counter())
        return counter

    def sent(self, peer: str | None, method: str, nbytes: int) -> None:
        with self._lock:
            for c in (self._peer(peer), self._service(method)):
                c.bytes_out += nbytes
                c.messages_out += 1

    def received(self, peer: str | None, method: str, nbytes: int) -> None:
        with self._lock:
            for c in (self._peer(peer), self._service(method)):
                c.bytes_in += nbytes
                c.messages_in += 1

    def latency(self, method: str, seconds: float, *, side: str = "client") -> None:
        """Record one call's duration (``side``: "client" or "server")."""
        key = f"{side}:{method}"
        with self._lock:
            hist = self._latency.get(key)
            if hist is None:
                hist = self._latency.setdefault(key, Histogram())
            hist.observe(seconds)

    def snapshot(self) -> dict[str, Any]:
        """A copy: {"peers": {peer: counters}, "services": {...}, "latency": {...}}."""
        with self._lock:
            return {
                "peers": {k: v.as_dict() for k, v in self._peers.items()},
                "services": {k: v.as_dict() for k, v in self._services.items()},
                "latency": {k: v.as_dict() for k, v in self._latency.items()},
            }


__all__ = ["BUCKETS_S", "Counter", "Histogram", "Traffic", "service_of"]
