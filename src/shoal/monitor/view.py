"""The swarm view: the freshest summary of every peer, assembled from whatever was fetched.

Pure: :func:`build_view` takes summaries and ``now`` and decides what is current. The I/O
that fetches summaries lives in :mod:`shoal.monitor.publish`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shoal.monitor.config import SwarmViewConfig
from shoal.monitor.summary import PeerSummary

__all__ = ["SwarmView", "build_view"]


@dataclass(frozen=True, slots=True)
class SwarmView:
    """Peers whose newest summary is fresh, and those whose newest summary went stale."""

    now: float
    peers: tuple[PeerSummary, ...]
    stale: tuple[PeerSummary, ...] = ()

    def by_peer(self) -> dict[str, PeerSummary]:
        return {s.peer: s for s in self.peers}

    def total_samples_per_s(self) -> float:
        return sum(s.samples_per_s for s in self.peers if s.role == "trainer")

    def max_step(self) -> int:
        return max((s.step for s in self.peers), default=0)


def build_view(summaries: Iterable[PeerSummary], now: float, config: SwarmViewConfig) -> SwarmView:
    """Keep the newest summary per peer; drop those dated too far in the future; split the
    rest into fresh (age <= ``stale_after_s``) and stale. Both are sorted by peer id."""
    newest: dict[str, PeerSummary] = {}
    for s in summaries:
        if s.t - now > config.max_future_s:
            continue
        old = newest.get(s.peer)
        if old is None or s.t > old.t:
            newest[s.peer] = s
    fresh: list[PeerSummary] = []
    stale: list[PeerSummary] = []
    for peer in sorted(newest):
        s = newest[peer]
        (fresh if now - s.t <= config.stale_after_s else stale).append(s)
    return SwarmView(now=now, peers=tuple(fresh), stale=tuple(stale))
