"""Routing decisions of the trainer: which server of a stage gets the next micro-batch.

Pure: every function takes ``now`` (seconds, any monotonic clock) and an ``rng``; no I/O.

The expected time of a request on server ``s`` is its measured latency plus the work queued
ahead of it divided by its throughput::

    t(s) = latency(s) + (queue(s) + inflight(s) + 1) / throughput(s)

where ``queue`` is what ``s`` announced (other trainers' work), ``inflight`` what this trainer
has sent it and not yet heard back, and ``latency`` an exponential average of this trainer's
observed round trips minus compute (a prior of ``DEFAULT_LATENCY_S`` until measured). A server
is chosen at random with weight ``1 / t(s)``: fast, idle, near servers get most of the work,
but every live server gets some, so measurements stay fresh. Banned servers are skipped.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DEFAULT_LATENCY_S", "Candidate", "ServerStats", "choose_server", "expected_time_s"]

DEFAULT_LATENCY_S = 0.05
MIN_THROUGHPUT = 1e-3


@dataclass(frozen=True, slots=True)
class Candidate:
    """A server as announced in the DHT."""

    peer: bytes
    """Raw PeerID."""
    address: str
    throughput: float
    """Announced samples/s."""
    queue_length: int
    """Announced queue."""


@dataclass(slots=True)
class ServerStats:
    """What this trainer observed of one server."""

    latency_s: float | None = None
    """Exponential average of observed network latency (None = not measured)."""
    inflight: int = 0
    """Requests sent and not yet answered."""
    banned_until: float = 0.0
    """Skipped until then (``now`` units)."""
    bans: int = 0
    """Bans so far; the next lasts ``ban_s * 2**bans``."""
    busy_until: float = 0.0
    """It answered BUSY; skipped until then unless nothing else is left."""

    def observe_latency(self, seconds: float, alpha: float) -> None:
        if self.latency_s is None:
            self.latency_s = seconds
        else:
            self.latency_s += alpha * (seconds - self.latency_s)

    def ban(self, now: float, base_s: float, max_s: float = 300.0) -> float:
        """Ban with doubling length; returns the end of the ban."""
        self.banned_until = now + min(base_s * 2**self.bans, max_s)
        self.bans += 1
        return self.banned_until


def expected_time_s(c: Candidate, s: ServerStats | None) -> float:
    """Expected seconds until ``c`` answers a new request (see the module docstring)."""
    latency = DEFAULT_LATENCY_S if s is None or s.latency_s is None else s.latency_s
    inflight = 0 if s is None else s.inflight
    return latency + (c.queue_length + inflight + 1) / max(c.throughput, MIN_THROUGHPUT)


def choose_server(
    candidates: Sequence[Candidate],
    stats: dict[bytes, ServerStats],
    rng: random.Random,
    now: float,
    exclude: frozenset[bytes] = frozenset(),
) -> Candidate | None:
    """A server for the next request, or None when every candidate is banned or excluded.

    Servers that answered BUSY recently are used only when no other server is left.
    """
    usable = [
        c
        for c in candidates
        if c.peer not in exclude and (c.peer not in stats or stats[c.peer].banned_until <= now)
    ]
    idle = [c for c in usable if c.peer not in stats or stats[c.peer].busy_until <= now]
    pool = idle or usable
    if not pool:
        return None
    weights = [1.0 / expected_time_s(c, stats.get(c.peer)) for c in pool]
    total = sum(weights)
    x = rng.random() * total
    for c, w in zip(pool, weights, strict=True):
        x -= w
        if x < 0:
            return c
    return pool[-1]
