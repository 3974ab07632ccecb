"""Prometheus metrics of one peer, in a registry of its own, optionally served over HTTP.

Each :class:`PeerMetrics` owns a ``CollectorRegistry`` (never the process-global one), so
several peers can live in one process. Traffic counters are not copied into Prometheus
counters: a collector reads the transport's cumulative counters through the injected
provider at scrape time, labelled by service and by (the busiest ``max_peer_labels``) peer.

The HTTP endpoint binds ``127.0.0.1`` by default; ``port=0`` picks a free port (see
:attr:`PeerMetrics.port`); ``port=None`` serves nothing. ``close()`` is idempotent.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from shoal.monitor.config import MetricsConfig
from shoal.monitor.traffic import TrafficCounters, TrafficProvider

__all__ = ["PeerMetrics"]

_ROUND_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _TrafficCollector(Collector):
    def __init__(self, provider: TrafficProvider, max_peers: int) -> None:
        self._provider = provider
        self._max_peers = max_peers

    def _families(
        self, kind: str, label: str, table: Mapping[str, TrafficCounters]
    ) -> Iterator[Metric]:
        for direction in ("sent", "received"):
            fam = CounterMetricFamily(
                f"shoal_{kind}_bytes_{direction}",
                f"Bytes {direction} per {label}.",
                labels=[kind],
            )
            for name, c in sorted(table.items()):
                fam.add_metric([name], getattr(c, f"bytes_{direction}"))
            yield fam
            fam = CounterMetricFamily(
                f"shoal_{kind}_messages_{direction}",
                f"Messages {direction} per {label}.",
                labels=[kind],
            )
            for name, c in sorted(table.items()):
                fam.add_metric([name], getattr(c, f"messages_{direction}"))
            yield fam

    def collect(self) -> Iterator[Metric]:
        snapshot = self._provider()
        yield from self._families("service", "service", snapshot.services)
        peers = snapshot.peers
        busiest = sorted(peers, key=lambda p: -(peers[p].bytes_sent + peers[p].bytes_received))
        shown = {p: peers[p] for p in busiest[: self._max_peers]}
        for p in busiest[self._max_peers :]:
            shown["other"] = shown.get("other", TrafficCounters()) + peers[p]
        yield from self._families("peer", "remote peer", shown)
        latency = HistogramMetricFamily(
            "shoal_rpc_latency_seconds", "Call latency per method.", labels=["side", "method"]
        )
        for key, h in sorted(snapshot.latency.items()):
            side, _, method = key.partition(":")
            buckets, running = [], 0
            for bound, count in zip(h.bounds_s, h.counts, strict=False):
                running += count
                buckets.append((repr(bound), running))
            buckets.append(("+Inf", running + h.counts[-1]))
            latency.add_metric([side, method], buckets, h.sum_s)
        yield latency


class PeerMetrics:
    """The metric families of one peer. Update methods are thread-safe (prometheus_client)."""

    def __init__(self, config: MetricsConfig, *, traffic: TrafficProvider | None = None) -> None:
        self.config = config
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.step = Gauge("shoal_step", "Current training step.", registry=r)
        self.train_loss = Gauge("shoal_train_loss", "Last training loss.", registry=r)
        self.val_bpb = Gauge("shoal_val_bpb", "Last validation bits per byte.", registry=r)
        self.samples_per_s = Gauge("shoal_samples_per_second", "Training samples/s.", registry=r)
        self.tokens_per_s = Gauge("shoal_tokens_per_second", "Training tokens/s.", registry=r)
        self.round_seconds = Histogram(
            "shoal_round_duration_seconds",
            "Duration of collective rounds.",
            ["kind"],
            buckets=_ROUND_BUCKETS_S,
            registry=r,
        )
        self.failures = Counter("shoal_failures", "Failed operations.", ["kind"], registry=r)
        self.retries = Counter("shoal_retries", "Retried operations.", ["kind"], registry=r)
        self.checkpoints = Counter("shoal_checkpoints", "Checkpoints written.", registry=r)
        self.checkpoint_step = Gauge(
            "shoal_checkpoint_step", "Step of the last checkpoint.", registry=r
        )
        self.phase_seconds = Counter(
            "shoal_phase_seconds", "Step time by phase.", ["phase"], registry=r
        )
        self.swarm_peers = Gauge("shoal_swarm_peers", "Peers in the swarm view.", registry=r)
        if traffic is not None:
            r.register(_TrafficCollector(traffic, config.max_peer_labels))
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def port(self) -> int | None:
        """The port actually bound, or None when not serving."""
        return None if self._server is None else int(self._server.server_port)

    def serve(self) -> int | None:
        """Start the HTTP endpoint if configured; returns the bound port. Idempotent."""
        with self._lock:
            if self._closed or self.config.port is None:
                return None
            if self._server is None:
                self._server, self._thread = start_http_server(
                    self.config.port, addr=self.config.host, registry=self.registry
                )
            return self.port

    def exposition(self) -> bytes:
        """The text exposition, as a scrape would return it."""
        return generate_latest(self.registry)

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop serving (bounded by ``timeout_s``). Safe to call twice."""
        with self._lock:
            self._closed = True
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout_s)
