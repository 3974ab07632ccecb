"""What a swarm round is given and what it gives: :class:`RoundsConfig` (how rounds form
and how long they may take, ``round_deadline_s`` included), :class:`RoundOutcome`, and
:func:`wait_outcome` (a round waited for from the compute thread). The round itself is
``SwarmRounds`` in ``swarm_round.py``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import math
import threading
import time
from dataclasses import dataclass, field

from shoal.compress.registry import STATELESS_CODECS
from shoal.errors import ConfigError
from shoal.net.identity import PeerID
from shoal.parallel.data.aggregate import check_kind
from shoal.parallel.data.rendezvous import MatchConfig

__all__ = [
    "DIAL_RESOLVE_S",
    "MAX_RETRY_KEYS",
    "MEMBERSHIP_READ_S",
    "RoundOutcome",
    "RoundsConfig",
    "announced_bandwidth",
    "moving_average",
    "retry_key",
    "wait_outcome",
]

_POLL_S = 0.1


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundsConfig:
    """How rounds form and how long they may take."""

    wire_codec: str = "int8"
    """Codec of the all-reduce messages: ``none`` (fp32), ``fp16`` or ``int8`` (blockwise)."""
    aggregation: str = "mean"
    """How reducers combine contributions: ``mean`` (weighted by samples; trusts what
    passes screening), ``trimmed_mean`` or ``centered_clip`` (robust to a minority of
    lying peers). Peers with different rules do not meet: the round key carries it."""
    window_initial_s: float = 15.0
    """How long the first window waits for the expected peers."""
    window_cap_s: float = 60.0
    """Longest window."""
    window_floor_s: float = 3.0
    """Shortest window. The window learns how long peers take to gather; when everyone is
    ready at once it would shrink to nothing, and a peer that falls a little behind (a
    restart, a slow step) would then never meet the others again."""
    window_period_fraction: float = 0.25
    """The window is also at least this fraction of the time between this peer's last two
    rounds. Peers that arrive together close it at once, so the wait is paid only while
    an expected peer is missing; a peer that misses a round loses its whole period of
    local work (it resyncs), and on a loaded machine arrival spreads grow with the period."""
    allreduce_timeout_s: float = 30.0
    """Budget of the all-reduce once the group is known."""
    min_group_size: int = 2
    """Groups smaller than this skip the round."""
    min_contributors: int = 2
    """A round whose result would hold fewer contributors fails (a peer alone is no swarm)."""
    max_group_size: int = 64
    """Largest all-reduce group."""
    poll_interval_s: float = 0.25
    """How often the board is read while a window is open (each read is a DHT lookup)."""
    client_mode: bool = False
    """Send parts and pull results, reduce nothing and announce no address (a slow peer, or
    one that cannot accept connections)."""
    bandwidth_prior_bps: float = 100e6
    """Uplink (bits/s) announced until a round has measured it."""
    screened_penalty: float = 3.0
    """Failure score a sender earns for each round whose contribution this peer refused
    as a reducer (see ``SwarmRounds._penalize``); 0 counts nothing."""

    def __post_init__(self) -> None:
        check_kind(self.aggregation, "aggregation")
        if self.wire_codec not in STATELESS_CODECS:
            raise ConfigError(
                f"wire_codec must be one of {', '.join(STATELESS_CODECS)}, got {self.wire_codec!r}"
            )
        if not 0 < self.window_initial_s <= self.window_cap_s:
            raise ConfigError(
                f"need 0 < window_initial_s <= window_cap_s, got "
                f"{self.window_initial_s!r}, {self.window_cap_s!r}"
            )
        if not self.window_floor_s > 0:
            raise ConfigError(f"window_floor_s must be > 0, got {self.window_floor_s!r}")
        if not 0 <= self.window_period_fraction <= 1:
            raise ConfigError(
                f"window_period_fraction must be in [0, 1], got {self.window_period_fraction!r}"
            )
        if not self.allreduce_timeout_s > 0:
            raise ConfigError(f"allreduce_timeout_s must be > 0, got {self.allreduce_timeout_s!r}")
        if not 1 <= self.min_group_size <= self.max_group_size:
            raise ConfigError(
                f"need 1 <= min_group_size <= max_group_size, got "
                f"{self.min_group_size!r}, {self.max_group_size!r}"
            )
        if not 0 <= self.screened_penalty < math.inf:
            raise ConfigError(
                f"screened_penalty must be >= 0 and finite, got {self.screened_penalty!r}"
            )
        if not 0 < self.bandwidth_prior_bps < math.inf:
            raise ConfigError(
                f"bandwidth_prior_bps must be > 0 and finite, got {self.bandwidth_prior_bps!r}"
            )

    @property
    def match(self) -> MatchConfig:
        """The group formation settings these rounds use."""
        return MatchConfig(
            max_group_size=self.max_group_size,
            min_group_size=self.min_group_size,
            poll_interval_s=self.poll_interval_s,
        )

    @property
    def round_deadline_s(self) -> float:
        """Longest a whole round may take: the membership read before it, the longest
        window, what matchmaking may take beyond it (board calls and the group
        confirmation, each bounded), resolving the members' addresses, the all-reduce and
        the one across groups (a round of more than ``max_group_size`` peers), and a second
        of margin. A caller that gives up sooner may cancel a round the others commit with
        this peer's contribution in it."""
        return (
            MEMBERSHIP_READ_S
            + self.window_cap_s
            + self.match.overrun_s
            + DIAL_RESOLVE_S
            + 2 * self.allreduce_timeout_s
            + 1.0
        )


def announced_bandwidth(bps: float) -> float:
    """``bps`` rounded to a half-octave grid: shares stay put under measurement noise."""
    return float(2.0 ** (round(2.0 * math.log2(max(bps, 1.0))) / 2.0))


def moving_average(average: float | None, sample: float | None) -> float | None:
    """Half the last average, half the new sample (either alone when the other is None)."""
    if sample is None or average is None:
        return sample if average is None else average
    return 0.5 * average + 0.5 * sample


MEMBERSHIP_READ_S = 3.0
"""Longest the membership read before a round may take (then the cached view is used)."""
DIAL_RESOLVE_S = 5.0
"""Longest resolving one member's announced address into one to dial may take (a relayed
member needs its relay asked)."""
MAX_RETRY_KEYS = 64
_RETRY = b"/after-"


def retry_key(round_key: bytes, failed_group_id: bytes) -> bytes:
    """The key a retry of ``round_key`` meets under after its all-reduce failed in the group
    ``failed_group_id`` (the same for every member of that group; bounded in length)."""
    base = round_key.split(_RETRY, 1)[0]
    tail = hashlib.blake2b(round_key + b"\0" + failed_group_id, digest_size=8).hexdigest()
    return base + _RETRY + tail.encode()


@dataclass(slots=True)
class RoundOutcome:
    """What one round gave this peer."""

    ok: bool
    contributors: frozenset[PeerID] = frozenset()
    weight: float = 0.0
    """Sum of the contributors' weights (samples; across groups under a robust rule, the
    contributors' count: no claimed weight is trusted there)."""
    group_size: int = 0
    reason: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    """``matchmaking`` and ``allreduce`` wall seconds."""
    included: bool = True
    """This peer's own contribution is in the result (a late or screened-out member gets the
    others' mean, ``ok``, without it: ``reason`` then says why)."""
    skipped: bool = False
    """No round was tried: no other live peer can average with this one (``reason`` says
    why). Round counts do not advance, so a peer that was alone for a while does not run
    ahead of the peers that join it."""
    expected: int = 0
    """Peers the membership view said could average with this one, itself included (0: not
    known)."""


def wait_outcome(
    future: concurrent.futures.Future[RoundOutcome],
    *,
    stop: threading.Event | None,
    timeout_s: float,
) -> RoundOutcome:
    """The outcome of a round running on the network loop, waited for from the compute
    thread. It is given up (cancelled, so it says it leaves, and counted failed) at
    ``timeout_s`` or as soon as ``stop`` is set; an error in it costs the round, not the
    peer."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return future.result(timeout=_POLL_S)
        except concurrent.futures.TimeoutError:
            stopping = stop is not None and stop.is_set()
            if stopping or time.monotonic() > deadline:
                future.cancel()
                why = "stopping" if stopping else f"no result within {timeout_s:.0f} s"
                return RoundOutcome(False, reason=why)
        except concurrent.futures.CancelledError:
            return RoundOutcome(False, reason="cancelled")
        except Exception as exc:  # a bug in a round must cost the round, not the peer
            return RoundOutcome(False, reason=f"round error: {type(exc).__name__}: {exc}")
