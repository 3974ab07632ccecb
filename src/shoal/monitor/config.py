"""Typed configuration of the monitor layer: metrics endpoint, event log, profiler, swarm view.

Every knob of monitoring lives here, with units in its name. Config flows down through
constructors; nothing reads the environment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from shoal.errors import ConfigError

__all__ = [
    "AlertConfig",
    "DashboardConfig",
    "EventLogConfig",
    "MetricsConfig",
    "MonitorConfig",
    "ProfilerConfig",
    "SwarmViewConfig",
]


def _positive(owner: str, name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{owner}.{name} must be a positive finite number, got {value!r}")


@dataclass(kw_only=True, slots=True)
class MetricsConfig:
    """The Prometheus endpoint of one peer."""

    port: int | None = None
    """TCP port of the ``/metrics`` endpoint; ``0`` picks a free port; ``None`` serves nothing
    (metrics are still collected and can be read from the registry)."""
    host: str = "127.0.0.1"
    """Address to bind; loopback unless the operator opens it on purpose."""
    max_peer_labels: int = 64
    """Traffic is labelled by remote peer for at most this many peers (the busiest); the rest
    are summed under ``peer="other"`` so a large swarm cannot blow up the label set."""

    def __post_init__(self) -> None:
        if self.port is not None and not (0 <= self.port <= 65535):
            raise ConfigError(f"MetricsConfig.port must be in 0..65535 or None, got {self.port!r}")
        if not self.host:
            raise ConfigError(f"MetricsConfig.host must be non-empty, got {self.host!r}")
        if self.max_peer_labels < 1:
            raise ConfigError(
                f"MetricsConfig.max_peer_labels must be >= 1, got {self.max_peer_labels!r}"
            )


@dataclass(kw_only=True, slots=True)
class EventLogConfig:
    """The append-only JSONL event log of one peer."""

    path: Path | None = None
    """File to append to; rotated files get suffixes ``.1`` (newest) .. ``.N``. ``None``
    keeps no log (events still reach the metrics)."""
    max_bytes: int = 16 * 1024 * 1024
    """Rotate before a write would make the file larger than this."""
    backups: int = 3
    """Rotated files kept; older ones are deleted."""
    max_record_bytes: int = 64 * 1024
    """One encoded event may not exceed this (nor ``max_bytes``); larger ones keep only their
    kind and a ``truncated`` marker with their size."""

    def __post_init__(self) -> None:
        if self.max_bytes < 1024:
            raise ConfigError(f"EventLogConfig.max_bytes must be >= 1024, got {self.max_bytes!r}")
        if self.backups < 0:
            raise ConfigError(f"EventLogConfig.backups must be >= 0, got {self.backups!r}")
        if self.max_record_bytes < 256:
            raise ConfigError(
                f"EventLogConfig.max_record_bytes must be >= 256, got {self.max_record_bytes!r}"
            )


@dataclass(kw_only=True, slots=True)
class ProfilerConfig:
    """The per-step time and traffic profiler."""

    window_steps: int = 100
    """The rolling summary covers this many most recent steps."""
    rate_window_s: float = 30.0
    """Samples/s, tokens/s and traffic rates are averaged over this much recent time."""

    def __post_init__(self) -> None:
        if self.window_steps < 1:
            raise ConfigError(
                f"ProfilerConfig.window_steps must be >= 1, got {self.window_steps!r}"
            )
        _positive("ProfilerConfig", "rate_window_s", self.rate_window_s)


@dataclass(kw_only=True, slots=True)
class SwarmViewConfig:
    """Publishing this peer's summary and assembling everyone's."""

    swarm: str = "default"
    """Name of the swarm (as in ``shoal.swarm.SwarmConfig.swarm``); part of the DHT keys."""
    shards: int = 4
    """Summaries are spread over this many DHT keys by peer (one DHT answer carries at most
    256 records and 1 MiB, so one key would cap the view at 256 peers)."""
    publish_interval_s: float = 10.0
    """How often a peer publishes its summary."""
    publish_timeout_s: float = 5.0
    """Deadline of one publish (a DHT store)."""
    record_ttl_s: float = 60.0
    """A published summary expires this long after it was written."""
    stale_after_s: float = 45.0
    """The aggregator drops a summary older than this."""
    max_future_s: float = 30.0
    """A summary dated further than this in the future (clock skew or forgery) is dropped."""

    def __post_init__(self) -> None:
        for name in (
            "publish_interval_s",
            "publish_timeout_s",
            "record_ttl_s",
            "stale_after_s",
            "max_future_s",
        ):
            _positive("SwarmViewConfig", name, getattr(self, name))
        if not self.swarm or len(self.swarm) > 64 or "/" in self.swarm:
            raise ConfigError(
                f"SwarmViewConfig.swarm must be 1..64 characters without '/', got {self.swarm!r}"
            )
        if not 1 <= self.shards <= 256:
            raise ConfigError(f"SwarmViewConfig.shards must be in 1..256, got {self.shards!r}")
        if self.record_ttl_s < self.publish_interval_s:
            raise ConfigError(
                "SwarmViewConfig.record_ttl_s must be >= publish_interval_s, "
                f"got {self.record_ttl_s!r} < {self.publish_interval_s!r}"
            )


@dataclass(kw_only=True, slots=True)
class AlertConfig:
    """Thresholds of the swarm alerts (see ``shoal.monitor.alerts``)."""

    stall_after_s: float = 120.0
    """The swarm is stalled when no peer's step advanced for this long."""
    straggler_ratio: float = 0.5
    """A trainer below this fraction of the median samples/s is a straggler."""
    straggler_min_peers: int = 3
    """Stragglers are only named when at least this many peers report throughput."""
    bottleneck_ratio: float = 0.7
    """A stage whose capacity is below this fraction of the median stage capacity, or whose
    demand exceeds its capacity, is a bottleneck."""
    low_bandwidth_bps: float = 1_000_000.0
    """A peer whose estimated link bandwidth (bits/s, either direction) is below this is
    flagged as low bandwidth."""

    def __post_init__(self) -> None:
        _positive("AlertConfig", "stall_after_s", self.stall_after_s)
        _positive("AlertConfig", "low_bandwidth_bps", self.low_bandwidth_bps)
        for name in ("straggler_ratio", "bottleneck_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < 1):
                raise ConfigError(f"AlertConfig.{name} must be in (0, 1), got {value!r}")
        if self.straggler_min_peers < 2:
            raise ConfigError(
                f"AlertConfig.straggler_min_peers must be >= 2, got {self.straggler_min_peers!r}"
            )


@dataclass(kw_only=True, slots=True)
class MonitorConfig:
    """Everything a peer's monitor needs."""

    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    events: EventLogConfig = field(default_factory=EventLogConfig)
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)
    swarm_view: SwarmViewConfig = field(default_factory=SwarmViewConfig)
    alerts: AlertConfig = field(default_factory=AlertConfig)


@dataclass(kw_only=True, slots=True)
class DashboardConfig:
    """The ``shoal monitor`` web dashboard."""

    host: str = "127.0.0.1"
    """Address the HTTP server binds; loopback unless opened on purpose."""
    port: int = 8321
    """HTTP port; 0 picks a free one."""
    poll_interval_s: float = 2.0
    """How often the dashboard fetches summaries from its source."""
    poll_timeout_s: float = 10.0
    """Deadline of one fetch."""
    history_points: int = 400
    """Points kept per chart series; older points are thinned out, never the newest."""
    max_peers: int = 1024
    """Peers remembered (fresh or stale); beyond it the longest-silent are forgotten."""
    events_kept: int = 200
    """Most recent events shown."""
    request_timeout_s: float = 5.0
    """Deadline for a client to send its whole request."""
    swarm_view: SwarmViewConfig = field(default_factory=SwarmViewConfig)
    alerts: AlertConfig = field(default_factory=AlertConfig)

    def __post_init__(self) -> None:
        if not (0 <= self.port <= 65535):
            raise ConfigError(f"DashboardConfig.port must be in 0..65535, got {self.port!r}")
        if not self.host:
            raise ConfigError(f"DashboardConfig.host must be non-empty, got {self.host!r}")
        for name in ("poll_interval_s", "poll_timeout_s", "request_timeout_s"):
            _positive("DashboardConfig", name, getattr(self, name))
        if self.history_points < 16:
            raise ConfigError(
                f"DashboardConfig.history_points must be >= 16, got {self.history_points!r}"
            )
        if self.max_peers < 1:
            raise ConfigError(f"DashboardConfig.max_peers must be >= 1, got {self.max_peers!r}")
        if self.events_kept < 0:
            raise ConfigError(f"DashboardConfig.events_kept must be >= 0, got {self.events_kept!r}")
