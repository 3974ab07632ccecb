"""PeerMonitor: the one object a peer creates for monitoring and passes around.

It bundles the Prometheus metrics, the event log, the step profiler and the state that goes
into the peer's published summary. Wiring, in a peer::

    monitor = PeerMonitor(config.monitor, peer=str(identity.peer_id),
                          traffic=net_traffic_provider(runtime.traffic))
    monitor.start()                                   # serves /metrics if configured
    monitor.set_role("trainer", stage=None)
    ...
    monitor.begin_step(step)
    with monitor.profiler.compute: ...                # forward/backward
    with monitor.profiler.communication: ...          # all-reduce
    monitor.end_step(loss=loss, samples=batch, tokens=batch * seq_len)
    monitor.record_round("allreduce", duration_s, group_size=4)
    monitor.record_failure("allreduce", error=str(exc))
    ...
    # on the network loop:
    async with SummaryPublisher(monitor.snapshot, store.publish, config.monitor.swarm_view):
        ...
    monitor.close()

Record methods are thread-safe: the compute thread and the network loop may both call them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from shoal.monitor.config import MonitorConfig
from shoal.monitor.events import Event, EventKind, EventLog
from shoal.monitor.metrics import PeerMetrics
from shoal.monitor.profiler import ProfileSummary, StepProfile, StepProfiler
from shoal.monitor.stats import RateMeter
from shoal.monitor.summary import REACHABILITY, PeerSummary
from shoal.monitor.traffic import TrafficProvider

__all__ = ["PeerMonitor"]


class PeerMonitor:
    """Metrics + event log + profiler + summary state of one peer. ``close()`` is idempotent."""

    def __init__(
        self,
        config: MonitorConfig,
        *,
        peer: str,
        traffic: TrafficProvider | None = None,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.config = config
        self.peer = peer
        self._traffic = traffic
        self._wall = wall_clock
        self.metrics = PeerMetrics(config.metrics, traffic=traffic)
        self.events = EventLog(config.events, peer=peer, clock=wall_clock)
        self.events.on_event = self._count_event
        self.profiler = StepProfiler(config.profiler, clock=clock, traffic=traffic)
        self._lock = threading.Lock()
        window = config.profiler.rate_window_s
        self._samples_rate, self._tokens_rate = RateMeter(window), RateMeter(window)
        self._tx_rate, self._rx_rate = RateMeter(window), RateMeter(window)
        self._samples_total = 0
        self._tokens_total = 0
        self._step = 0
        self._step_t = wall_clock()
        self._loss: float | None = None
        self._val_bpb: float | None = None
        self._role = "trainer"
        self._stage: int | None = None
        self._reachability = "unknown"
        self._up_bps: float | None = None
        self._down_bps: float | None = None
        self._demand_per_s: float | None = None
        self._rounds = 0
        self._failures = 0
        self._members: set[str] | None = None
        self._started = False
        self._closed = False

    # lifecycle ---------------------------------------------------------------------------
    def start(self) -> int | None:
        """Serve metrics (if a port is configured) and log a start event; returns the port."""
        port = self.metrics.serve()
        if not self._started:
            self._started = True
            self.events.emit(EventKind.START, metrics_port=port)
        return port

    def close(self) -> None:
        """Log a stop event, stop serving metrics, close the log. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._started:
            self.events.emit(EventKind.STOP, step=self._step)
        self.metrics.close()
        self.events.close()

    def __enter__(self) -> PeerMonitor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # training progress ---------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        self.profiler.begin_step(step)

    def end_step(
        self,
        *,
        step: int | None = None,
        loss: float | None = None,
        samples: int = 0,
        tokens: int = 0,
    ) -> StepProfile:
        """Close the profiler's step and record progress; returns the step's profile."""
        profile = self.profiler.end_step()
        done = profile.step if step is None else step
        self.record_progress(done + 1, loss=loss, samples=samples, tokens=tokens)
        m = self.metrics.phase_seconds
        m.labels("compute").inc(profile.compute_s)
        m.labels("communication").inc(profile.communication_s)
        m.labels("waiting").inc(profile.waiting_s)
        m.labels("other").inc(profile.other_s)
        return profile

    def record_progress(
        self, step: int, *, loss: float | None = None, samples: int = 0, tokens: int = 0
    ) -> None:
        """The peer reached ``step`` (steps done); ``samples``/``tokens`` were processed
        since the last call. Stage servers call this with the samples they served."""
        now = self._wall()
        with self._lock:
            if step != self._step:
                self._step, self._step_t = step, now
            if loss is not None:
                self._loss = float(loss)
            self._samples_total += samples
            self._tokens_total += tokens
            self._samples_rate.observe(now, self._samples_total)
            self._tokens_rate.observe(now, self._tokens_total)
            sps, tps = self._samples_rate.rate(), self._tokens_rate.rate()
        self.metrics.step.set(step)
        if loss is not None:
            self.metrics.train_loss.set(loss)
        self.metrics.samples_per_s.set(sps)
        self.metrics.tokens_per_s.set(tps)

    def record_validation(self, step: int, val_bpb: float) -> None:
        with self._lock:
            self._val_bpb = float(val_bpb)
        self.metrics.val_bpb.set(val_bpb)
        self.events.emit(EventKind.VALIDATION, step=step, val_bpb=val_bpb)

    # events --------------------------------------------------------------------------------
    def record_round(self, kind: str, duration_s: float, **fields: Any) -> None:
        with self._lock:
            self._rounds += 1
        self.metrics.round_seconds.labels(kind).observe(duration_s)
        self.events.emit(EventKind.ROUND, round_kind=kind, duration_s=duration_s, **fields)

    def record_failure(self, kind: str, **fields: Any) -> None:
        self.events.emit(EventKind.FAILURE, what=kind, **fields)

    def record_retry(self, kind: str, attempt: int, **fields: Any) -> None:
        self.events.emit(EventKind.RETRY, what=kind, attempt=attempt, **fields)

    def record_checkpoint(self, step: int, **fields: Any) -> None:
        self.events.emit(EventKind.CHECKPOINT, step=step, **fields)

    def record_join(self, peer: str, **fields: Any) -> None:
        self.events.emit(EventKind.JOIN, other=peer, **fields)

    def record_leave(self, peer: str, **fields: Any) -> None:
        self.events.emit(EventKind.LEAVE, other=peer, **fields)

    def observe_members(self, peers: Iterable[str]) -> tuple[list[str], list[str]]:
        """Feed the current membership (e.g. ``swarm.peers()`` ids, on every change or
        heartbeat); logs a join or leave event per difference from the previous call and
        returns ``(joined, left)``. The first call only records the set."""
        current = set(peers)
        with self._lock:
            previous, self._members = self._members, current
        self.metrics.swarm_peers.set(len(current))
        if previous is None:
            return [], []
        joined, left = sorted(current - previous), sorted(previous - current)
        for peer in joined:
            self.record_join(peer)
        for peer in left:
            self.record_leave(peer)
        return joined, left

    def _count_event(self, event: Event) -> None:
        kind, fields = event.kind, event.fields
        if kind == EventKind.FAILURE.value:
            with self._lock:
                self._failures += 1
            self.metrics.failures.labels(str(fields.get("what", "unknown"))).inc()
        elif kind == EventKind.RETRY.value:
            self.metrics.retries.labels(str(fields.get("what", "unknown"))).inc()
        elif kind == EventKind.CHECKPOINT.value:
            self.metrics.checkpoints.inc()
            step = fields.get("step")
            if isinstance(step, int):
                self.metrics.checkpoint_step.set(step)

    # role and link -------------------------------------------------------------------------
    def set_role(self, role: str, stage: int | None = None) -> None:
        """Set what this peer does; logs a stage_change event when it changed."""
        with self._lock:
            changed = (role, stage) != (self._role, self._stage)
            old = (self._role, self._stage)
            self._role, self._stage = role, stage
        if changed:
            self.events.emit(
                EventKind.STAGE_CHANGE, role=role, stage=stage, old_role=old[0], old_stage=old[1]
            )

    def set_reachability(self, reachability: str) -> None:
        if reachability not in REACHABILITY:
            raise ValueError(f"reachability must be one of {REACHABILITY}, got {reachability!r}")
        with self._lock:
            self._reachability = reachability

    def set_bandwidth(self, up_bps: float | None, down_bps: float | None) -> None:
        """The link capacity this peer measured, in bits per second."""
        with self._lock:
            self._up_bps, self._down_bps = up_bps, down_bps

    def set_demand(self, samples_per_s: float | None) -> None:
        """For stage servers: samples/s requested of this server."""
        with self._lock:
            self._demand_per_s = samples_per_s

    # summaries -----------------------------------------------------------------------------
    def profile_summary(self) -> ProfileSummary | None:
        return self.profiler.summary()

    def summary(self) -> PeerSummary:
        """This peer's compact summary now (also updates traffic rates)."""
        now = self._wall()
        total = self._traffic().total() if self._traffic is not None else None
        prof = self.profiler.summary()
        fr = prof.fractions() if prof is not None else {}
        with self._lock:
            if total is not None:
                self._tx_rate.observe(now, total.bytes_sent)
                self._rx_rate.observe(now, total.bytes_received)
            return PeerSummary(
                peer=self.peer,
                t=now,
                step=self._step,
                step_t=self._step_t,
                loss=self._loss,
                val_bpb=self._val_bpb,
                samples_per_s=self._samples_rate.rate(now),
                tokens_per_s=self._tokens_rate.rate(now),
                role=self._role,
                stage=self._stage,
                reachability=self._reachability,
                up_bps=self._up_bps,
                down_bps=self._down_bps,
                tx_bps=8 * self._tx_rate.rate(now),
                rx_bps=8 * self._rx_rate.rate(now),
                demand_per_s=self._demand_per_s,
                compute_frac=min(1.0, fr.get("compute", 0.0)),
                comm_frac=min(1.0, fr.get("communication", 0.0)),
                wait_frac=min(1.0, fr.get("waiting", 0.0)),
                rounds=self._rounds,
                failures=self._failures,
            )

    def snapshot(self) -> PeerSummary:
        """:meth:`summary`, also written to the event log (the dashboard can replay logs)."""
        s = self.summary()
        self.events.emit(EventKind.SUMMARY, **s.to_dict())
        return s
