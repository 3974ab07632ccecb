"""Swarm alerts, computed as a pure function of (view, now, thresholds).

Rules:

- ``stalled``: no peer's step advanced for ``stall_after_s`` (judged from each summary's
  ``step_t``, the wall time its step last changed).
- ``straggler``: a trainer whose samples/s is below ``straggler_ratio`` x the median of the
  trainers reporting throughput (needs ``straggler_min_peers`` of them).
- ``bottleneck``: among pipeline stages (summaries with a ``stage``), the one with the highest
  demand/capacity; named when its demand exceeds its capacity, or when its capacity is below
  ``bottleneck_ratio`` x the median stage capacity. Capacity is the sum of samples/s of its
  servers; demand the sum of their reported ``demand_per_s``.
- ``low_bandwidth``: a peer whose measured link capacity (up or down) is below
  ``low_bandwidth_bps``.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.monitor.config import AlertConfig
from shoal.monitor.stats import median
from shoal.monitor.view import SwarmView

__all__ = ["Alert", "compute_alerts"]


@dataclass(frozen=True, slots=True)
class Alert:
    kind: str
    severity: str
    """``warning`` or ``critical``."""
    message: str
    peer: str | None = None
    stage: int | None = None


def _fmt_bps(bps: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.1f} {unit}"
    return f"{bps:.0f} bit/s"


def _stalled(view: SwarmView, now: float, cfg: AlertConfig) -> list[Alert]:
    if not view.peers:
        return []
    last = max(s.step_t for s in view.peers)
    idle = now - last
    if idle <= cfg.stall_after_s:
        return []
    return [
        Alert(
            "stalled",
            "critical",
            f"swarm stalled: no step progress for {idle:.0f} s (step {view.max_step()})",
        )
    ]


def _stragglers(view: SwarmView, cfg: AlertConfig) -> list[Alert]:
    trainers = [s for s in view.peers if s.role == "trainer" and s.samples_per_s > 0]
    if len(trainers) < cfg.straggler_min_peers:
        return []
    mid = median([s.samples_per_s for s in trainers])
    return [
        Alert(
            "straggler",
            "warning",
            f"straggler {s.peer[:12]}: {s.samples_per_s:.1f} samples/s vs median {mid:.1f}",
            peer=s.peer,
        )
        for s in trainers
        if s.samples_per_s < cfg.straggler_ratio * mid
    ]


def _bottleneck(view: SwarmView, cfg: AlertConfig) -> list[Alert]:
    capacity: dict[int, float] = {}
    demand: dict[int, float] = {}
    for s in view.peers:
        if s.stage is None:
            continue
        capacity[s.stage] = capacity.get(s.stage, 0.0) + s.samples_per_s
        demand[s.stage] = demand.get(s.stage, 0.0) + (s.demand_per_s or 0.0)
    if len(capacity) < 2:
        return []
    mid = median(list(capacity.values()))

    def load(stage: int) -> float:
        cap = capacity[stage]
        if cap <= 0:
            return float("inf")
        return demand[stage] / cap if demand[stage] > 0 else mid / cap

    worst = max(sorted(capacity), key=load)
    cap, dem = capacity[worst], demand[worst]
    if dem > cap or cap < cfg.bottleneck_ratio * mid:
        detail = f"demand {dem:.1f}/s" if dem > 0 else f"median stage {mid:.1f}/s"
        return [
            Alert(
                "bottleneck",
                "warning",
                f"bottleneck stage {worst}: capacity {cap:.1f} samples/s, {detail}",
                stage=worst,
            )
        ]
    return []


def _low_bandwidth(view: SwarmView, cfg: AlertConfig) -> list[Alert]:
    out = []
    for s in view.peers:
        links = [b for b in (s.up_bps, s.down_bps) if b is not None]
        if links and min(links) < cfg.low_bandwidth_bps:
            out.append(
                Alert(
                    "low_bandwidth",
                    "warning",
                    f"low bandwidth {s.peer[:12]}: {_fmt_bps(min(links))}",
                    peer=s.peer,
                )
            )
    return out


def compute_alerts(view: SwarmView, now: float, config: AlertConfig) -> list[Alert]:
    """All alerts that hold for ``view`` at time ``now``, most severe first."""
    alerts = (
        _stalled(view, now, config)
        + _bottleneck(view, config)
        + _stragglers(view, config)
        + _low_bandwidth(view, config)
    )
    return sorted(alerts, key=lambda a: a.severity != "critical")
