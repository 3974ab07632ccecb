"""Relay limits: ``RelayConfig`` and the per-circuit ``TokenBucket`` (pure, injected clock).

A relay gives its bandwidth to strangers, so every resource is bounded: reservations
(unreachable peers listening), open circuits, bytes per second per circuit, idle time, and
how long a dialer waits for the target to accept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shoal.errors import ConfigError

__all__ = ["RelayConfig", "TokenBucket"]

MAX_FRAME_BYTES = 256 * 1024
"""Largest payload of one relay frame; larger frames are a protocol violation."""


@dataclass(kw_only=True, slots=True)
class RelayConfig:
    """What a public peer grants as a relay."""

    max_reservations: int = 64
    """Unreachable peers that may listen here at once."""
    max_circuits: int = 128
    """Open circuits at once (over all reservations)."""
    max_circuits_per_peer: int = 16
    """Open circuits at once to one target."""
    rate_bytes_s: float = 8e6
    """Bytes per second per circuit and direction (token bucket refill)."""
    burst_bytes: int = 1 << 20
    """Token bucket size: bytes a circuit may send at once after a quiet period."""
    idle_timeout_s: float = 60.0
    """A circuit that carried no byte for this long is closed."""
    accept_timeout_s: float = 10.0
    """How long a dialer waits for the target to accept a circuit."""
    keepalive_s: float = 15.0
    """Period of keepalive events on a reservation stream."""
    queue_frames: int = 16
    """Frames buffered per circuit and direction (flow control does the rest)."""

    def __post_init__(self) -> None:
        for name in ("max_reservations", "max_circuits", "max_circuits_per_peer", "queue_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"RelayConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("rate_bytes_s", "idle_timeout_s", "accept_timeout_s", "keepalive_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"RelayConfig.{name} must be > 0, got {value!r}")
        if not isinstance(self.burst_bytes, int) or self.burst_bytes < MAX_FRAME_BYTES:
            raise ConfigError(
                f"RelayConfig.burst_bytes must be an int >= {MAX_FRAME_BYTES}, "
                f"got {self.burst_bytes!r}"
            )


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``delay_s(n, now)`` takes ``n`` tokens.

    Taking more tokens than are present goes into debt; the answer is how long the caller
    must wait before sending, so a sender is held to ``rate`` on average.
    """

    __slots__ = ("_last_s", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now_s: float) -> None:
        if not rate > 0 or not burst > 0:
            raise ConfigError(f"TokenBucket needs rate > 0 and burst > 0, got {rate!r}, {burst!r}")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last_s = now_s

    def delay_s(self, n: int, now_s: float) -> float:
        """Take ``n`` tokens at ``now_s``; seconds to wait before the bytes may go."""
        elapsed = max(0.0, now_s - self._last_s)
        self._last_s = max(self._last_s, now_s)
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
