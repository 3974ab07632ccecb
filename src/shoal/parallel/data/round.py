"""Configuration and outcome of one all-reduce round (see ``allreduce.py``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from shoal.errors import ConfigError
from shoal.parallel.data.aggregate import AggregationConfig
from shoal.parallel.data.messages import Member

__all__ = ["AllReduceConfig", "RoundResult", "RoundStatus"]


class RoundStatus(enum.Enum):
    OK = "ok"
    FAILED = "failed"


@dataclass(frozen=True, kw_only=True, slots=True)
class AllReduceConfig:
    """Phase deadlines as fractions of the round's time budget, and aggregation."""

    collect_fraction: float = 0.55
    """Reducers stop accepting contributions at this fraction of the budget."""
    report_fraction: float = 0.65
    """Members stop waiting for reducers' reports at this fraction."""
    repair_fraction: float = 0.85
    """Survivors stop waiting for repair contributions at this fraction."""
    min_contributors: int = 1
    """A round with fewer contributors fails."""
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)

    def __post_init__(self) -> None:
        fractions = (self.collect_fraction, self.report_fraction, self.repair_fraction)
        if not 0 < fractions[0] < fractions[1] < fractions[2] < 1:
            raise ConfigError(
                "need 0 < collect_fraction < report_fraction < repair_fraction < 1, got "
                f"{fractions}"
            )
        if self.min_contributors < 1:
            raise ConfigError(f"min_contributors must be >= 1, got {self.min_contributors!r}")


@dataclass(slots=True)
class RoundResult:
    """Outcome of one round, as seen by one member."""

    status: RoundStatus
    contributors: frozenset[Member] = frozenset()
    """Members whose vectors make up every element of the result (empty on failure)."""
    weight: float = 0.0
    """Sum of the contributors' weights; contributors under one tag count once."""
    tags: dict[Member, bytes] = field(default_factory=dict)
    """The tag of each contributor that sent one (see ``Contribution.tag``)."""
    excluded: dict[Member, str] = field(default_factory=dict)
    """Members left out, with the reason (rejected by screening, late, silent)."""
    reason: str = ""
    """Why the round failed (empty on success)."""
    reassigned: dict[int, Member] = field(default_factory=dict)
    """Parts whose reducer was left out (presumed dead, or cut off: few could reach it),
    and who reduced them instead."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each phase on this member."""
    screened: dict[Member, str] = field(default_factory=dict)
    """Peers whose messages this member refused itself, with the reason: contributions it
    screened out as a reducer (not a number, too large, an impossible weight), and result
    parts it could not use (not finite, the wrong size), which an honest reducer never
    sends. What it saw, unlike ``excluded``, which also holds what other reducers' reports
    claim. The ground for counting it against a peer."""

    @property
    def ok(self) -> bool:
        return self.status is RoundStatus.OK
