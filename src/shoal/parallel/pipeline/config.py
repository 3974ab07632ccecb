"""Every knob of the pipeline in one place, with units in the names.

``StageServerConfig`` tunes one stage server (queue, budgets, optimizer, accumulation,
announcements, averaging, rebalancing); ``TrainerConfig`` tunes the trainer's router
(concurrency, deadlines, retries, bans). Both raise ConfigError naming field and value.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.errors import ConfigError

__all__ = ["CODECS", "StageServerConfig", "TrainerConfig"]

CODECS = ("none", "int8", "subspace", "subspace-int8")
"""Boundary codecs (see ``codecs.py``)."""


def _check(obj: object, positive: tuple[str, ...] = (), nonneg: tuple[str, ...] = ()) -> None:
    for name in positive:
        value = getattr(obj, name)
        if not value > 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be > 0, got {value!r}")
    for name in nonneg:
        value = getattr(obj, name)
        if not value >= 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be >= 0, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class StageServerConfig:
    """One stage server."""

    num_stages: int = 4
    """Stages the model is cut into (boundaries spread evenly over the blocks)."""
    prefix: str = "shoal/pipeline"
    """DHT key prefix; peers of one run share it (key ``<prefix>/stage/<k>``)."""
    seed: int = 0
    """Seed of the initial model weights (every peer derives the same)."""
    max_queue: int = 64
    """Requests admitted (waiting or computing); beyond it the answer is BUSY."""
    max_saved: int = 256
    """Forward contexts kept for their backward; the oldest is dropped beyond it."""
    context_ttl_s: float = 60.0
    """A forward context whose backward did not come within this is dropped (abandoned)."""
    applied_ttl_s: float = 600.0
    """Request ids of applied backwards are remembered this long (dedupe of retries)."""
    max_budget_s: float = 120.0
    """Largest per-request budget a caller may ask for."""
    optimizer: str = "adamw"
    """"adamw" or "sgd"."""
    lr: float = 1e-3
    """Learning rate of the stage's optimizer."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    accumulate: int = 4
    """The optimizer steps after every this many applied backward passes (mean gradient)."""
    announce_period_s: float = 2.0
    """How often the DHT announcement is refreshed."""
    announce_ttl_s: float = 10.0
    """Lifetime of one announcement (a dead server disappears after this)."""
    average_period_s: float = 0.0
    """Average weights with same-stage servers this often (0 = never)."""
    average_timeout_s: float = 10.0
    """Deadline of one averaging round."""
    rebalance_period_s: float = 0.0
    """Evaluate moving to another stage this often (0 = never)."""
    rebalance_hysteresis: float = 0.2
    """A move must raise the bottleneck throughput by more than this fraction."""
    min_dwell_s: float = 10.0
    """A server stays at least this long on a stage before moving again."""
    codec_rank: int = 16
    """Rank of the subspace codec at every boundary."""
    codec_block_size: int = 256
    """Block size of the int8 codec."""
    throughput_window_s: float = 10.0
    """Window of the rolling throughput measure."""
    default_throughput: float = 1.0
    """Throughput announced before anything was measured (samples/s)."""

    def __post_init__(self) -> None:
        _check(
            self,
            (
                "num_stages",
                "max_queue",
                "max_saved",
                "context_ttl_s",
                "applied_ttl_s",
                "max_budget_s",
                "lr",
                "accumulate",
                "announce_period_s",
                "announce_ttl_s",
                "average_timeout_s",
                "codec_rank",
                "codec_block_size",
                "throughput_window_s",
                "default_throughput",
            ),
            (
                "weight_decay",
                "average_period_s",
                "rebalance_period_s",
                "rebalance_hysteresis",
                "min_dwell_s",
            ),
        )
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(
                f"StageServerConfig.optimizer must be adamw or sgd, got {self.optimizer!r}"
            )
        if self.announce_ttl_s <= self.announce_period_s:
            raise ConfigError(
                f"StageServerConfig.announce_ttl_s ({self.announce_ttl_s!r}) "
                f"must exceed announce_period_s ({self.announce_period_s!r})"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainerConfig:
    """The trainer's router."""

    num_stages: int = 4
    """Stages of the model (must match the servers)."""
    prefix: str = "shoal/pipeline"
    """DHT key prefix of the run."""
    codec: str = "none"
    """Boundary codec: one of ``CODECS``."""
    max_inflight: int = 16
    """Micro-batches on their way through the pipeline at once."""
    call_budget_s: float = 30.0
    """Deadline of one forward or backward call (the server gets the same budget)."""
    max_attempts: int = 6
    """Tries of one hop (forward or backward at one stage) before the micro-batch fails."""
    busy_backoff_s: float = 0.02
    """Wait before re-routing after every candidate of a stage answered BUSY."""
    refresh_period_s: float = 1.0
    """How often the server lists are re-read from the DHT."""
    ban_s: float = 5.0
    """First ban of a server that failed; doubles per ban (see ``shoal.net`` health)."""
    latency_alpha: float = 0.2
    """Weight of a new sample in the per-server latency average."""

    def __post_init__(self) -> None:
        _check(
            self,
            (
                "num_stages",
                "max_inflight",
                "call_budget_s",
                "max_attempts",
                "busy_backoff_s",
                "refresh_period_s",
                "ban_s",
                "latency_alpha",
            ),
        )
        if self.codec not in CODECS:
            raise ConfigError(f"TrainerConfig.codec must be one of {CODECS}, got {self.codec!r}")
        if self.latency_alpha > 1:
            raise ConfigError(
                f"TrainerConfig.latency_alpha must be <= 1, got {self.latency_alpha!r}"
            )
