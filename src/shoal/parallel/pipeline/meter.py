"""A rolling throughput measure: samples per second of busy compute over a time window.

``record(samples, busy_s, now)`` after each piece of work; ``throughput(now)`` is the samples
done within the last ``window_s`` divided by the compute seconds they took. That is the rate
the server sustains when saturated (its capacity), not the rate it happens to be fed at, so
an idle server does not look slow. Pure: ``now`` comes in as an argument.
"""

from __future__ import annotations

import collections

__all__ = ["ThroughputMeter"]


class ThroughputMeter:
    """Samples per busy second over the last ``window_s`` (``default`` when empty)."""

    def __init__(self, window_s: float, default: float, max_events: int = 4096) -> None:
        self.window_s = window_s
        self.default = default
        self._events: collections.deque[tuple[float, float, float]] = collections.deque(
            maxlen=max_events
        )

    def record(self, samples: float, busy_s: float, now: float) -> None:
        self._events.append((now, samples, max(busy_s, 1e-6)))

    def throughput(self, now: float) -> float:
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()
        if not self._events:
            return self.default
        samples = sum(e[1] for e in self._events)
        busy = sum(e[2] for e in self._events)
        return samples / busy
