"""Monitoring: per-peer metrics, event log and step profiler; the swarm view; the dashboard.

A peer creates one :class:`PeerMonitor` and passes it around; observers build a
:class:`Dashboard` over a source of published summaries. See README.md in this folder.
"""

from shoal.monitor.config import (
    AlertConfig,
    DashboardConfig,
    EventLogConfig,
    MetricsConfig,
    MonitorConfig,
    ProfilerConfig,
    SwarmViewConfig,
)
from shoal.monitor.events import EventKind
from shoal.monitor.peer import PeerMonitor
from shoal.monitor.profiler import Phase
from shoal.monitor.publish import DhtSummaryStore, MemorySummaryStore, SummaryPublisher
from shoal.monitor.summary import PeerSummary
from shoal.monitor.traffic import TrafficCounters

__all__ = [
    "AlertConfig",
    "DashboardConfig",
    "DhtSummaryStore",
    "EventKind",
    "EventLogConfig",
    "MemorySummaryStore",
    "MetricsConfig",
    "MonitorConfig",
    "PeerMonitor",
    "PeerSummary",
    "Phase",
    "ProfilerConfig",
    "SummaryPublisher",
    "SwarmViewConfig",
    "TrafficCounters",
]
