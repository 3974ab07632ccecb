"""Deciding whether this peer is publicly reachable, from dial-back reports (pure).

A peer asks several others ("helpers") to dial back its advertised address. Each report says
which helper answered, the ``ip:port`` the helper saw our request come from (and from which
of our local ports), and whether its dial-back reached us. ``assess(reports, now)`` turns
the fresh reports into a verdict:

- one vote per helper (its newest report); reports older than ``max_age_s`` and reports
  where the helper could not tell (``dial_back_ok is None``) do not vote;
- PUBLIC when at least ``min_votes`` helpers reached us and they are not outnumbered by
  helpers that could not; PRIVATE when at least ``min_votes`` could not and they outnumber
  those that could; UNKNOWN otherwise (too few or split votes);
- public addresses are the observed addresses reported by at least ``min_votes`` helpers;
- the NAT mapping is ``"none"`` when helpers saw our own address and port, ``"cone"`` when
  several helpers saw one ``ip:port`` for one local port, ``"symmetric"`` when they saw
  different ports for one local port (hole punching will fail), else ``"unknown"``.

A single helper can lie; requiring ``min_votes`` distinct helpers bounds what one can do.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from shoal.errors import ConfigError

__all__ = ["DialBackReport", "Reachability", "ReachabilityConfig", "Verdict", "assess"]


class Reachability(enum.Enum):
    PUBLIC = "public"
    PRIVATE = "private"
    UNKNOWN = "unknown"


@dataclass(frozen=True, kw_only=True, slots=True)
class DialBackReport:
    helper: str
    """Who answered (a PeerID string); one vote per helper."""
    at_s: float
    """When the report arrived (monotonic seconds)."""
    observed: tuple[str, int] | None
    """``(ip, port)`` the helper saw our request come from, if it said."""
    local: tuple[str, int] | None
    """Our own ``(ip, port)`` of the connection the helper observed, if known."""
    dial_back_ok: bool | None
    """Whether the helper's dial-back reached us; None when it could not tell."""


@dataclass(kw_only=True, slots=True)
class ReachabilityConfig:
    min_votes: int = 2
    """Distinct helpers needed for a verdict or a public address."""
    max_age_s: float = 600.0
    """Reports older than this do not vote."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_votes <= 64:
            raise ConfigError(f"min_votes must be in [1, 64], got {self.min_votes!r}")
        if not self.max_age_s > 0:
            raise ConfigError(f"max_age_s must be > 0, got {self.max_age_s!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Verdict:
    status: Reachability
    reached: int
    """Helpers whose dial-back reached us."""
    unreached: int
    """Helpers whose dial-back did not."""
    public_addresses: tuple[tuple[str, int], ...] = field(default=())
    mapping: str = "unknown"
    """``none`` | ``cone`` | ``symmetric`` | ``unknown`` (see the module docstring)."""


def _latest_per_helper(
    reports: Iterable[DialBackReport], now_s: float, max_age_s: float
) -> list[DialBackReport]:
    latest: dict[str, DialBackReport] = {}
    for report in reports:
        if not 0 <= now_s - report.at_s <= max_age_s:
            continue
        held = latest.get(report.helper)
        if held is None or report.at_s >= held.at_s:
            latest[report.helper] = report
    return list(latest.values())


def _mapping(reports: list[DialBackReport], min_votes: int) -> str:
    seen = [r for r in reports if r.observed is not None and r.local is not None]
    if len(seen) < min_votes:
        return "unknown"
    if all(r.observed == r.local for r in seen):
        return "none"
    by_local: dict[tuple[str, int] | None, set[tuple[str, int] | None]] = {}
    for r in seen:
        by_local.setdefault(r.local, set()).add(r.observed)
    if any(len(observed) > 1 for observed in by_local.values()):
        return "symmetric"
    local_counts = Counter(r.local for r in seen)
    return "cone" if max(local_counts.values()) >= min_votes else "unknown"


def assess(
    reports: Iterable[DialBackReport], now_s: float, config: ReachabilityConfig | None = None
) -> Verdict:
    """The reachability verdict from dial-back ``reports`` as of ``now_s`` (pure)."""
    cfg = config or ReachabilityConfig()
    fresh = _latest_per_helper(reports, now_s, cfg.max_age_s)
    reached = sum(1 for r in fresh if r.dial_back_ok is True)
    unreached = sum(1 for r in fresh if r.dial_back_ok is False)
    if reached >= cfg.min_votes and reached >= unreached:
        status = Reachability.PUBLIC
    elif unreached >= cfg.min_votes and unreached > reached:
        status = Reachability.PRIVATE
    else:
        status = Reachability.UNKNOWN
    votes = Counter(r.observed for r in fresh if r.observed is not None)
    addresses = tuple(
        sorted(addr for addr, count in votes.items() if count >= cfg.min_votes and addr)
    )
    return Verdict(
        status=status,
        reached=reached,
        unreached=unreached,
        public_addresses=addresses,
        mapping=_mapping(fresh, cfg.min_votes),
    )
