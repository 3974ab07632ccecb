"""Small pure statistics: percentiles and a windowed rate meter driven by an injected clock."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

__all__ = ["RateMeter", "median", "percentile"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks.

    Raises ValueError on an empty sequence or ``q`` outside 0..100.
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in 0..100, got {q!r}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    frac = pos - lo
    return ordered[lo] + (ordered[hi] - ordered[lo]) * frac


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


class RateMeter:
    """Rate of a cumulative quantity over the last ``window_s`` seconds.

    Feed it ``(now, cumulative_total)`` observations; :meth:`rate` is the slope between the
    oldest observation still inside the window and the newest. Not thread-safe.
    """

    def __init__(self, window_s: float) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be positive, got {window_s!r}")
        self._window_s = window_s
        self._points: deque[tuple[float, float]] = deque()

    def observe(self, now: float, total: float) -> None:
        if self._points and total < self._points[-1][1]:
            self._points.clear()  # the counter was reset
        self._points.append((now, total))
        # Keep one point at or beyond the window's edge so the slope spans the whole window.
        while len(self._points) > 2 and now - self._points[1][0] >= self._window_s:
            self._points.popleft()

    def rate(self, now: float | None = None) -> float:
        """Units per second; 0.0 until two observations exist, or when the newest one is
        older than the window (nothing happened lately)."""
        if len(self._points) < 2:
            return 0.0
        (t0, v0), (t1, v1) = self._points[0], self._points[-1]
        if now is not None and now - t1 > self._window_s:
            return 0.0
        if t1 <= t0:
            return 0.0
        return (v1 - v0) / (t1 - t0)
