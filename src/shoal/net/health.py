"""Per-peer failure scores and temporary bans (pure: ``now_s`` comes in as an argument).

Each failed attempt adds ``failure_weight`` to the peer's score (an idempotent call the
client retries counts each attempt; calls queued on one handshake count it once, see
``pool.py``); the score halves every ``score_half_life_s``. A score reaching
``ban_threshold`` bans the peer for ``ban_base_s * 2**(n-1)`` (capped at ``ban_max_s``)
where n counts its bans within ``ban_memory_s``; the score restarts at zero. A success
halves the score. Routing (the pool, and layers above via ``is_banned``) skips banned
peers. Keys are labels: the pool scores failed dials under ``peer@address`` and what a
peer answered under its PeerID.
A peer that calls us is up again: the bans its addresses earned are lifted, once per ban
(``forgive_reach``), so a peer restarted at the same address is not shunned for what its
old process's death cost.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.net.config import HealthConfig


@dataclass(slots=True)
class _Record:
    score: float = 0.0
    at_s: float = 0.0
    banned_until_s: float = 0.0
    bans: int = 0
    last_ban_s: float = float("-inf")
    forgiven_s: float = float("-inf")
    """When :meth:`PeerHealth.forgive_reach` last lifted this record's ban."""


class PeerHealth:
    """Failure scores and bans keyed by peer label (a PeerID string or an address)."""

    def __init__(self, config: HealthConfig, max_peers: int = 4096) -> None:
        self._config = config
        self._max = max_peers
        self._peers: dict[str, _Record] = {}

    def _decayed(self, rec: _Record, now_s: float) -> float:
        dt = max(0.0, now_s - rec.at_s)
        return float(rec.score * 0.5 ** (dt / self._config.score_half_life_s))

    def score(self, peer: str, now_s: float) -> float:
        rec = self._peers.get(peer)
        return 0.0 if rec is None else self._decayed(rec, now_s)

    def banned_until(self, peer: str, now_s: float) -> float | None:
        """End of the peer's current ban, or None when it is not banned."""
        rec = self._peers.get(peer)
        if rec is None or rec.banned_until_s <= now_s:
            return None
        return rec.banned_until_s

    def is_banned(self, peer: str, now_s: float) -> bool:
        return self.banned_until(peer, now_s) is not None

    def failure(self, peer: str, now_s: float, weight: float = 1.0) -> bool:
        """Record a failure; returns True when it started a ban."""
        cfg = self._config
        rec = self._peers.get(peer)
        if rec is None:
            self._prune(now_s)
            rec = self._peers.setdefault(peer, _Record(at_s=now_s))
        rec.score = self._decayed(rec, now_s) + cfg.failure_weight * weight
        rec.at_s = now_s
        # a hair of tolerance: strikes a few microseconds apart still add up to the threshold
        if rec.score < cfg.ban_threshold * (1 - 1e-6) or rec.banned_until_s > now_s:
            return False
        if now_s - rec.last_ban_s > cfg.ban_memory_s:
            rec.bans = 0
        rec.bans += 1
        rec.banned_until_s = now_s + min(cfg.ban_base_s * 2 ** (rec.bans - 1), cfg.ban_max_s)
        rec.last_ban_s = now_s
        rec.score = 0.0
        return True

    def success(self, peer: str, now_s: float) -> None:
        rec = self._peers.get(peer)
        if rec is not None:
            rec.score = self._decayed(rec, now_s) / 2.0
            rec.at_s = now_s

    def forgive_reach(self, label: str, now_s: float) -> list[str]:
        """``label``'s peer proved it is up (it called us): lift the bans its addresses
        earned while it was down (keys ``label@address``), not what it answered (key
        ``label``). Returns those addresses.

        Once per ban: a peer that can call us but that we cannot dial (a NAT, a wrong
        announced address) would otherwise lift every ban with a handshake, and we would
        keep dialing it. Its ban count stays, so each next ban is longer."""
        prefix = f"{label}@"
        addresses = []
        for key, rec in self._peers.items():
            if key.startswith(prefix) and rec.last_ban_s > rec.forgiven_s:
                rec.score, rec.banned_until_s, rec.forgiven_s = 0.0, 0.0, now_s
                addresses.append(key[len(prefix) :])
        return addresses

    def _prune(self, now_s: float) -> None:
        if len(self._peers) < self._max:
            return
        cfg = self._config
        for peer in [
            p
            for p, r in self._peers.items()
            if r.banned_until_s <= now_s
            and now_s - r.last_ban_s > cfg.ban_memory_s
            and self._decayed(r, now_s) < 0.01 * cfg.ban_threshold
        ]:
            del self._peers[peer]
        while len(self._peers) >= self._max:  # everyone is relevant: forget the oldest
            del self._peers[next(iter(self._peers))]


__all__ = ["PeerHealth"]
