"""What the dashboard remembers between polls, and the JSON state it serves. Pure.

:class:`History` turns a stream of summaries (repeated or not, in any order per poll) into
bounded chart series: training loss and validation bpb per peer over time, and the swarm's
total samples/s. :func:`dashboard_state` renders (view, alerts, history, events) as the
JSON document behind ``/api/state``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from shoal.monitor.alerts import Alert
from shoal.monitor.events import Event
from shoal.monitor.stats import median
from shoal.monitor.summary import PeerSummary
from shoal.monitor.view import SwarmView

__all__ = ["History", "Series", "dashboard_state", "event_text", "view_changes"]


class Series:
    """Points ``(t, step, value)`` in time order, at most ``max_points``: when full, every
    other older point is dropped (the newest always stays), so a long run keeps its shape."""

    def __init__(self, max_points: int) -> None:
        self.max_points = max_points
        self.points: list[tuple[float, int, float]] = []

    def add(self, t: float, step: int, value: float) -> None:
        if self.points and t <= self.points[-1][0]:
            return
        self.points.append((t, step, value))
        if len(self.points) > self.max_points:
            self.points = [*self.points[:-1:2], self.points[-1]]


class History:
    """Chart series built from summaries: loss and validation get one point per (peer,
    step), samples/s one point per (peer, summary time)."""

    def __init__(self, max_points: int, max_peers: int = 64) -> None:
        self._max_points = max_points
        self._max_peers = max_peers
        self.loss: dict[str, Series] = {}
        self.val: dict[str, Series] = {}
        self.samples: dict[str, Series] = {}
        self.throughput = Series(max_points)
        self._last_step: dict[tuple[str, str], int] = {}

    def _series(self, table: dict[str, Series], peer: str) -> Series | None:
        if peer not in table:
            if len(table) >= self._max_peers:
                return None
            table[peer] = Series(self._max_points)
        return table[peer]

    def add(self, summaries: Iterable[PeerSummary]) -> None:
        for s in sorted(summaries, key=lambda s: s.t):
            for name, table, value in (("loss", self.loss, s.loss), ("val", self.val, s.val_bpb)):
                if value is None:
                    continue
                # One point per step per peer: repeated polls of the same step add nothing.
                if self._last_step.get((name, s.peer)) == s.step:
                    continue
                series = self._series(table, s.peer)
                if series is not None:
                    self._last_step[(name, s.peer)] = s.step
                    series.add(s.t, s.step, value)
            rate = self._series(self.samples, s.peer)
            if rate is not None:
                rate.add(s.t, s.step, s.samples_per_s)

    def add_throughput(self, view: SwarmView) -> None:
        if view.peers:
            self.throughput.add(view.now, view.max_step(), view.total_samples_per_s())


def view_changes(
    old: SwarmView, new: SwarmView, old_alerts: list[Alert], new_alerts: list[Alert]
) -> list[Event]:
    """Events a dashboard derives from two successive views (for sources that carry no
    events of their own): peers appearing or going stale, alerts raised or cleared."""
    out = []
    before, after = {s.peer for s in old.peers}, {s.peer for s in new.peers}
    for peer in sorted(after - before):
        out.append(Event(new.now, peer, "seen", {}))
    for peer in sorted(before - after):
        out.append(Event(new.now, peer, "stale", {}))
    raised = {(a.kind, a.message) for a in old_alerts}
    current = {(a.kind, a.message) for a in new_alerts}
    for a in new_alerts:
        if (a.kind, a.message) not in raised:
            out.append(Event(new.now, a.peer or "swarm", "alert", {"message": a.message}))
    for a in old_alerts:
        if (a.kind, a.message) not in current:
            out.append(Event(new.now, a.peer or "swarm", "cleared", {"message": a.message}))
    return out


def _peer_row(s: PeerSummary, now: float, stale: bool) -> dict[str, Any]:
    row = s.to_dict()
    row["last_seen_s"] = max(0.0, now - s.t)
    row["stale"] = stale
    return row


def event_text(event: Event) -> str:
    """A one-line description of an event for humans."""
    f = event.fields
    if set(f) == {"message"}:
        return str(f["message"])[:200]
    skip = {"peer", "t"}
    parts = [f"{k}={v}" for k, v in f.items() if k not in skip and not isinstance(v, dict)]
    return " ".join(parts)[:200]


def _breakdown(peers: Iterable[PeerSummary]) -> dict[str, float] | None:
    rows = [s for s in peers if s.compute_frac + s.comm_frac + s.wait_frac > 0]
    if not rows:
        return None
    n = len(rows)
    c = sum(s.compute_frac for s in rows) / n
    m = sum(s.comm_frac for s in rows) / n
    w = sum(s.wait_frac for s in rows) / n
    return {"compute": c, "communication": m, "waiting": w, "other": max(0.0, 1 - c - m - w)}


def dashboard_state(
    view: SwarmView,
    alerts: list[Alert],
    history: History,
    events: deque[Event] | list[Event],
    *,
    source: str,
) -> dict[str, Any]:
    """The ``/api/state`` document (plain JSON types only)."""
    losses = [s.loss for s in view.peers if s.loss is not None]
    return {
        "now": view.now,
        "source": source,
        "swarm": {
            "peers": len(view.peers),
            "stale_peers": len(view.stale),
            "step": view.max_step(),
            "samples_per_s": view.total_samples_per_s(),
            "loss": median(losses) if losses else None,
        },
        "peers": [_peer_row(s, view.now, False) for s in view.peers]
        + [_peer_row(s, view.now, True) for s in view.stale],
        "alerts": [
            {
                "kind": a.kind,
                "severity": a.severity,
                "message": a.message,
                "peer": a.peer,
                "stage": a.stage,
            }
            for a in alerts
        ],
        "breakdown": _breakdown(view.peers),
        "series": {
            "loss": {p: s.points for p, s in sorted(history.loss.items())},
            "val": {p: s.points for p, s in sorted(history.val.items())},
            "samples": {p: s.points for p, s in sorted(history.samples.items())},
            "throughput": history.throughput.points,
        },
        "events": [
            {"t": e.t, "peer": e.peer, "kind": e.kind, "text": event_text(e)}
            for e in list(events)[::-1]
        ],
    }
