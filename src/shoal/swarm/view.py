"""The live membership view: pure logic over (heartbeats seen, now).

Rules:

* a heartbeat is (peer, info, expires_at), taken from a validated, signed DHT record;
* heartbeats claiming ``expires_at > now + ttl_s + max_clock_skew_s`` are ignored (a peer
  cannot buy a long stay), and each accepted expiry is clamped to ``seen_at + ttl_s``;
* per peer the latest expiry wins; ``live(now)`` lists peers whose expiry is after ``now``.

Hence a peer that goes silent at ``t0`` (its last heartbeat expiring by ``t0 + ttl_s +
max_clock_skew_s``, and ``max_clock_skew_s < ttl_s``) leaves the view before ``t0 + 2 ttl_s``,
whether or not the view is refreshed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shoal.net.identity import PeerID
from shoal.swarm.peerinfo import PeerInfo

__all__ = ["Member", "MembershipView"]


@dataclass(frozen=True, slots=True)
class Member:
    """A peer in the view."""

    peer_id: PeerID
    info: PeerInfo
    expires_at: float
    """When this peer leaves the view unless a newer heartbeat is seen (Unix seconds)."""


class MembershipView:
    """Peers currently believed alive."""

    def __init__(self, *, ttl_s: float, max_clock_skew_s: float) -> None:
        self._ttl_s = ttl_s
        self._skew_s = max_clock_skew_s
        self._members: dict[bytes, Member] = {}

    def update(self, heartbeats: Iterable[tuple[PeerID, PeerInfo, float]], now: float) -> int:
        """Merge heartbeats seen at ``now``; returns how many were accepted."""
        accepted = 0
        for peer, info, expires_at in heartbeats:
            if expires_at <= now or expires_at > now + self._ttl_s + self._skew_s:
                continue
            expires_at = min(expires_at, now + self._ttl_s)
            old = self._members.get(peer.raw)
            if old is None or expires_at > old.expires_at:
                self._members[peer.raw] = Member(peer, info, expires_at)
            accepted += 1
        return accepted

    def live(self, now: float) -> list[Member]:
        """Live members ordered by PeerID; expired ones are forgotten."""
        for raw in [r for r, m in self._members.items() if m.expires_at <= now]:
            del self._members[raw]
        return [self._members[r] for r in sorted(self._members)]
