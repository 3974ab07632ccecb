"""Where a step's time and bytes go: compute vs communication vs waiting, per service and peer.

Usage from the compute thread::

    prof.begin_step(step)
    with prof.compute:        # forward/backward
        ...
    with prof.communication:  # sending/receiving tensors
        ...
    with prof.waiting:        # blocked on a future, a barrier, a slow peer
        ...
    profile = prof.end_step()

Phases are exclusive: entering a phase inside another pauses the outer one, so the three
phase times never add up to more than the step's wall time; the rest is ``other``. Entering
and leaving a phase costs a few microseconds (two clock reads, no allocation, no lock).
Time measured elsewhere (e.g. on the network loop) is added with the thread-safe :meth:`add`.

At each ``end_step`` the profiler reads the transport's cumulative counters through the
injected :data:`~shoal.monitor.traffic.TrafficProvider` and stores that step's delta. The
rolling :meth:`summary` covers the last ``window_steps`` steps.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shoal.monitor.config import ProfilerConfig
from shoal.monitor.stats import percentile
from shoal.monitor.traffic import (
    EMPTY_TRAFFIC,
    TrafficCounters,
    TrafficProvider,
    TrafficSnapshot,
    traffic_delta,
)

__all__ = ["Phase", "PhaseStats", "ProfileSummary", "StepProfile", "StepProfiler"]


class Phase(str, enum.Enum):
    COMPUTE = "compute"
    COMMUNICATION = "communication"
    WAITING = "waiting"


_PHASES = tuple(Phase)
_INDEX = {p: i for i, p in enumerate(_PHASES)}


@dataclass(frozen=True, slots=True)
class StepProfile:
    """One finished step. Times in seconds."""

    step: int
    wall_s: float
    compute_s: float
    communication_s: float
    waiting_s: float
    traffic: TrafficSnapshot = EMPTY_TRAFFIC
    """Bytes and messages of this step, per peer and per service."""

    @property
    def other_s(self) -> float:
        return max(0.0, self.wall_s - self.compute_s - self.communication_s - self.waiting_s)


@dataclass(frozen=True, slots=True)
class PhaseStats:
    total_s: float
    mean_s: float
    p50_s: float
    p90_s: float
    p99_s: float
    fraction: float
    """Share of the window's wall time."""

    @classmethod
    def of(cls, values: list[float], wall_total_s: float) -> PhaseStats:
        total = sum(values)
        return cls(
            total_s=total,
            mean_s=total / len(values),
            p50_s=percentile(values, 50),
            p90_s=percentile(values, 90),
            p99_s=percentile(values, 99),
            fraction=total / wall_total_s if wall_total_s > 0 else 0.0,
        )


@dataclass(frozen=True, slots=True)
class ProfileSummary:
    """The rolling window. ``phases`` has keys wall, compute, communication, waiting, other."""

    steps: int
    phases: dict[str, PhaseStats]
    bytes_by_service: dict[str, TrafficCounters]
    bytes_by_peer: dict[str, TrafficCounters]

    def fractions(self) -> dict[str, float]:
        return {name: stats.fraction for name, stats in self.phases.items() if name != "wall"}

    def to_dict(self) -> dict[str, Any]:
        def counters(c: TrafficCounters) -> dict[str, int]:
            return {"sent": c.bytes_sent, "received": c.bytes_received}

        return {
            "steps": self.steps,
            "phases": {
                name: {k: getattr(s, k) for k in PhaseStats.__slots__}
                for name, s in self.phases.items()
            },
            "bytes_by_service": {k: counters(v) for k, v in self.bytes_by_service.items()},
            "bytes_by_peer": {k: counters(v) for k, v in self.bytes_by_peer.items()},
        }


class _PhaseTimer:
    """A reusable context manager bound to one phase of one profiler."""

    __slots__ = ("_index", "_profiler")

    def __init__(self, profiler: StepProfiler, index: int) -> None:
        self._profiler = profiler
        self._index = index

    def __enter__(self) -> None:
        self._profiler._enter(self._index)

    def __exit__(self, *exc: object) -> None:
        self._profiler._exit()


class StepProfiler:
    """Per-step phase timer and traffic accountant. Phase timers, ``begin_step`` and
    ``end_step`` belong to one thread (the compute thread); ``add``, ``recent`` and
    ``summary`` may be called from any."""

    def __init__(
        self,
        config: ProfilerConfig | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
        traffic: TrafficProvider | None = None,
    ) -> None:
        self._config = config or ProfilerConfig()
        self._clock = clock
        self._traffic = traffic
        self._acc = [0.0, 0.0, 0.0]
        self._stack: list[int] = []
        self._since = 0.0
        self._step = 0
        self._step_start = clock()
        self._last_traffic: TrafficSnapshot = traffic() if traffic else EMPTY_TRAFFIC
        self._external = [0.0, 0.0, 0.0]
        self._lock = threading.Lock()
        self._window: deque[StepProfile] = deque(maxlen=self._config.window_steps)
        self.compute = _PhaseTimer(self, 0)
        self.communication = _PhaseTimer(self, 1)
        self.waiting = _PhaseTimer(self, 2)

    def phase(self, phase: Phase | str) -> _PhaseTimer:
        """The timer of ``phase`` (also available as attributes ``compute`` etc.)."""
        return (self.compute, self.communication, self.waiting)[_INDEX[Phase(phase)]]

    def _enter(self, index: int) -> None:
        now = self._clock()
        stack = self._stack
        if stack:
            self._acc[stack[-1]] += now - self._since
        stack.append(index)
        self._since = now

    def _exit(self) -> None:
        now = self._clock()
        self._acc[self._stack.pop()] += now - self._since
        self._since = now

    def add(self, phase: Phase | str, seconds: float) -> None:
        """Add time measured elsewhere to the current step; safe from any thread."""
        with self._lock:
            self._external[_INDEX[Phase(phase)]] += max(0.0, seconds)

    def begin_step(self, step: int) -> None:
        """Start timing ``step``. Time in phases before this call is discarded. Optional: a
        step that is not begun starts where the previous one ended."""
        now = self._clock()
        self._step = step
        self._step_start = now
        self._acc = [0.0, 0.0, 0.0]
        if self._stack:
            self._since = now
        with self._lock:
            self._external = [0.0, 0.0, 0.0]

    def end_step(self) -> StepProfile:
        """Close the current step and record it. A phase still open is counted up to now
        and keeps running into the next step."""
        now = self._clock()
        if self._stack:
            self._acc[self._stack[-1]] += now - self._since
            self._since = now
        with self._lock:
            external, self._external = self._external, [0.0, 0.0, 0.0]
        acc = [a + e for a, e in zip(self._acc, external, strict=True)]
        delta = EMPTY_TRAFFIC
        if self._traffic is not None:
            current = self._traffic()
            delta = traffic_delta(self._last_traffic, current)
            self._last_traffic = current
        wall = max(now - self._step_start, sum(acc))
        profile = StepProfile(self._step, wall, acc[0], acc[1], acc[2], delta)
        with self._lock:
            self._window.append(profile)
        self._step += 1
        self._step_start = now
        self._acc = [0.0, 0.0, 0.0]
        return profile

    def recent(self) -> list[StepProfile]:
        """The steps in the window, oldest first; safe from any thread."""
        with self._lock:
            return list(self._window)

    def summary(self) -> ProfileSummary | None:
        """Statistics over the last ``window_steps`` steps; ``None`` before the first. Safe
        from any thread."""
        window = self.recent()
        if not window:
            return None
        wall = [p.wall_s for p in window]
        wall_total = sum(wall)
        columns = {
            "wall": wall,
            "compute": [p.compute_s for p in window],
            "communication": [p.communication_s for p in window],
            "waiting": [p.waiting_s for p in window],
            "other": [p.other_s for p in window],
        }
        merged = EMPTY_TRAFFIC
        for p in window:
            merged = merged.merged(p.traffic)
        return ProfileSummary(
            steps=len(window),
            phases={name: PhaseStats.of(vals, wall_total) for name, vals in columns.items()},
            bytes_by_service=dict(merged.services),
            bytes_by_peer=dict(merged.peers),
        )
