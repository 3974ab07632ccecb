"""Membership settings (units in the names), checked on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from shoal.errors import ConfigError

__all__ = ["SwarmConfig"]


@dataclass(frozen=True, kw_only=True, slots=True)
class SwarmConfig:
    """How a peer announces itself and watches the others."""

    swarm: str = "default"
    """Name of the swarm; peers of different swarms do not see each other."""
    ttl_s: float = 60.0
    """Lifetime of one heartbeat; a silent peer leaves every view within 2 * ttl_s."""
    heartbeat_interval_s: float = 20.0
    """Period of our own heartbeats (must be well under ttl_s)."""
    refresh_interval_s: float = 20.0
    """Period at which the view is re-read from the DHT."""
    max_clock_skew_s: float = 10.0
    """Heartbeats claiming expiry beyond now + ttl_s + this are refused (must be < ttl_s)."""
    shards: int = 4
    """Peers spread over this many DHT keys (each holds up to 64 announcements per answer)."""
    timeout_s: float = 10.0
    """Deadline of one heartbeat store or one view refresh."""

    def __post_init__(self) -> None:
        for name in ("ttl_s", "heartbeat_interval_s", "refresh_interval_s", "timeout_s", "shards"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"SwarmConfig.{name} must be > 0, got {value!r}")
        if not 0 <= self.max_clock_skew_s < self.ttl_s:
            raise ConfigError(
                f"SwarmConfig.max_clock_skew_s must be in [0, ttl_s={self.ttl_s}), "
                f"got {self.max_clock_skew_s!r}"
            )
        if self.heartbeat_interval_s > self.ttl_s / 2:
            raise ConfigError(
                f"SwarmConfig.heartbeat_interval_s must be <= ttl_s / 2 ({self.ttl_s / 2}), "
                f"got {self.heartbeat_interval_s!r}"
            )
        if not self.swarm or len(self.swarm) > 64 or not self.swarm.isprintable():
            raise ConfigError(
                f"SwarmConfig.swarm must be 1..64 printable chars, got {self.swarm!r}"
            )
