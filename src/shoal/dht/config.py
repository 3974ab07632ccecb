"""Every knob of the DHT in one place, with units in the names.

``DHTConfig`` tunes the protocol (Kademlia constants, deadlines, maintenance periods);
``RecordLimits`` bounds what a node accepts and keeps. Both are checked on construction
and raise :class:`~shoal.errors.ConfigError` naming the field and the value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from shoal.errors import ConfigError

__all__ = ["DHTConfig", "RecordLimits"]


def _check_positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be > 0, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class RecordLimits:
    """What a node accepts into (and keeps in) its record store."""

    max_key_bytes: int = 256
    """Largest key, in bytes."""
    max_subkey_bytes: int = 64
    """Largest subkey; a subkey starts with its owner's 32-byte PeerID."""
    max_value_bytes: int = 16 * 1024
    """Largest value, in bytes."""
    max_ttl_s: float = 24 * 3600.0
    """Records that expire later than now + max_ttl_s + max_clock_skew_s are refused."""
    max_clock_skew_s: float = 30.0
    """Tolerated disagreement between the writer's clock and ours."""
    max_records: int = 10_000
    """Records kept per node; beyond it the soonest-expiring records are evicted."""
    max_bytes: int = 32 * 1024 * 1024
    """Bytes of keys, subkeys and values kept per node; same eviction rule."""
    max_records_per_message: int = 256
    """Records one STORE or FIND_VALUE answer may carry. One key's records must all fit in
    an answer for readers to agree on them: every peer ready for an averaging round
    announces under one key, and a swarm's membership spreads over a few keys. (It was 64:
    a swarm of 80 ready peers read different 64-record subsets and split into groups that
    did not match; peers of that version refuse an answer of more.)"""
    max_answer_bytes: int = 1024 * 1024
    """Bytes of records (``Record.size_bytes``) one FIND_VALUE answer may carry: with
    16 KiB values, 256 records would not fit in a gRPC message."""

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_positive(self, f.name)
        if self.max_subkey_bytes < 32:
            raise ConfigError(
                f"RecordLimits.max_subkey_bytes must be >= 32 (a PeerID), got {self.max_subkey_bytes}"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class DHTConfig:
    """Kademlia parameters and deadlines of one DHT node."""

    k: int = 20
    """Bucket size and replication factor."""
    alpha: int = 3
    """Parallel RPCs in flight during an iterative lookup."""
    replacement_cache_size: int = 8
    """Standby contacts kept per bucket, most recently seen first."""
    rpc_timeout_s: float = 2.0
    """Deadline of one RPC (request sent to answer received)."""
    slow_rpc_s: float = 0.6
    """A lookup RPC unanswered this long frees its lane for another candidate (it may still
    answer until ``rpc_timeout_s``); about twice a slow link's round trip."""
    lookup_timeout_s: float = 10.0
    """Deadline of one whole iterative lookup; a ``store`` takes at most this plus one
    ``rpc_timeout_s`` (its STOREs run in parallel after the lookup)."""
    max_failures: int = 2
    """Consecutive failed RPCs after which a contact is dropped from its bucket."""
    value_quorum: int = 3
    """A FIND_VALUE lookup ends early once this many nodes returned records."""
    republish_interval_s: float = 600.0
    """Holders re-store records they have not seen re-stored for this long; writers re-store
    their own records on the same period."""
    refresh_interval_s: float = 3600.0
    """Buckets with no lookup for this long are refreshed by a lookup of a random ID in them."""
    maintenance_period_s: float = 30.0
    """How often the maintenance task wakes to republish and refresh what is due."""
    rejoin_interval_s: float = 60.0
    """The bootstrap addresses are pinged again this often (one attempt) and our own ID looked
    up through those that answer, so a node that dropped every contact on the far side of a
    partition finds them again once it heals. 0 disables it."""
    seed_check_s: float = 10.0
    """While a bootstrap address's peer is missing from the routing table (it restarted
    with an empty table, or it failed and was dropped), or no bootstrap address ever
    answered, the bootstrap addresses are pinged this often (one attempt, no lookup); each
    check that does not bring the seed back doubles the wait, up to ``rejoin_interval_s``.
    0 leaves it to ``rejoin_interval_s``."""
    limits: RecordLimits = field(default_factory=RecordLimits)

    def __post_init__(self) -> None:
        _check_positive(
            self,
            "k",
            "alpha",
            "replacement_cache_size",
            "rpc_timeout_s",
            "slow_rpc_s",
            "lookup_timeout_s",
            "max_failures",
            "value_quorum",
            "republish_interval_s",
            "refresh_interval_s",
            "maintenance_period_s",
        )
        for name in ("rejoin_interval_s", "seed_check_s"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"DHTConfig.{name} must be >= 0 (0 disables), got {getattr(self, name)!r}"
                )
        if self.alpha > self.k:
            raise ConfigError(f"DHTConfig.alpha must be <= k ({self.k}), got {self.alpha}")
        if self.slow_rpc_s > self.rpc_timeout_s:
            raise ConfigError(
                f"DHTConfig.slow_rpc_s ({self.slow_rpc_s}) must be <= rpc_timeout_s "
                f"({self.rpc_timeout_s})"
            )
        if self.rpc_timeout_s > self.lookup_timeout_s:
            raise ConfigError(
                f"DHTConfig.rpc_timeout_s ({self.rpc_timeout_s}) must be <= lookup_timeout_s "
                f"({self.lookup_timeout_s})"
            )
