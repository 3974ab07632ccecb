"""The rendezvous board peers announce readiness on, and the async loop that forms a group.

``RendezvousBoard`` is the small interface matchmaking needs: announce an entry under a
round key (one entry per peer, expiring), and read all entries for a key. The DHT's signed
records with subkeys (key = round key, subkey = peer id) provide it in a swarm;
:class:`MemoryBoard` provides it in one process for tests.

``find_group`` announces this peer, polls the board until the window closes (everyone
expected is ready, or the window from :class:`FormationEstimator` ran out), then derives
the groups with :func:`form_groups` and returns the one holding this peer (or ``None``).
Polls are bounded in count and time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from shoal.errors import ConfigError
from shoal.parallel.data.matchmaking import (
    FormationEstimator,
    Group,
    ReadyPeer,
    form_groups,
    window_closed,
)

__all__ = ["MatchConfig", "MemoryBoard", "RendezvousBoard", "find_group"]


class RendezvousBoard(Protocol):
    """Where ready peers meet. Entries expire at ``expires_at`` (board clock, seconds)."""

    async def announce(self, key: bytes, entry: ReadyPeer, expires_at: float) -> None: ...

    async def entries(self, key: bytes) -> list[ReadyPeer]: ...


class MemoryBoard:
    """In-process board with an injectable clock (tests, single-process swarms)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._entries: dict[bytes, dict[bytes, tuple[ReadyPeer, float]]] = {}

    async def announce(self, key: bytes, entry: ReadyPeer, expires_at: float) -> None:
        self._entries.setdefault(key, {})[entry.peer] = (entry, expires_at)

    async def entries(self, key: bytes) -> list[ReadyPeer]:
        now = self._clock()
        return [e for e, exp in self._entries.get(key, {}).values() if exp > now]


@dataclass(frozen=True, kw_only=True, slots=True)
class MatchConfig:
    """Group formation settings."""

    max_group_size: int = 16
    """Largest all-reduce group."""
    min_group_size: int = 2
    """Smaller groups skip the round."""
    poll_interval_s: float = 0.1
    """How often the board is read while the window is open."""
    max_polls: int = 10_000
    """Hard bound on board reads per window."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_group_size <= self.max_group_size:
            raise ConfigError(
                f"need 1 <= min_group_size <= max_group_size, got "
                f"{self.min_group_size!r}, {self.max_group_size!r}"
            )
        if not self.poll_interval_s > 0:
            raise ConfigError(f"poll_interval_s must be > 0, got {self.poll_interval_s!r}")
        if self.max_polls < 1:
            raise ConfigError(f"max_polls must be >= 1, got {self.max_polls!r}")


async def find_group(
    board: RendezvousBoard,
    round_key: bytes,
    me: ReadyPeer,
    *,
    expected_peers: int,
    estimator: FormationEstimator,
    config: MatchConfig,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Group | None:
    """Announce, wait for the window to close, and return this peer's group (or None)."""
    opened_at = clock()
    window_s = estimator.window_s()
    await board.announce(round_key, me, expires_at=opened_at + 2 * window_s + 1.0)
    ready: list[ReadyPeer] = []
    for _ in range(config.max_polls):
        ready = await board.entries(round_key)
        now = clock()
        if window_closed(
            now=now,
            opened_at=opened_at,
            window_s=window_s,
            n_ready=len(ready),
            expected_peers=expected_peers,
        ):
            break
        wait = min(config.poll_interval_s, opened_at + window_s - now)
        await sleep(max(0.0, wait))
    estimator.observe(clock() - opened_at)
    groups = form_groups(
        round_key,
        ready,
        max_group_size=config.max_group_size,
        min_group_size=config.min_group_size,
    )
    for group in groups:
        if any(p.peer == me.peer for p in group.members):
            return group
    return None
