"""Pure matchmaking decisions: when a round's window closes and who averages with whom.

Peers that are ready for a round announce themselves (see ``rendezvous.py`` for the board
they announce on). Two decisions, both pure functions of (state, now):

- **Window length** comes from history, not a constant: :class:`FormationEstimator` keeps an
  exponentially weighted mean and mean deviation of how long past windows took to fill
  (like TCP's RTO estimator) and proposes ``mean + deviation_factor * deviation``, clamped
  to ``[floor_s, cap_s]``. A window closes early once as many peers are ready as the
  most any ready peer expects: every announcement carries its peer's count of live
  trainers, so a peer whose membership view lags (it just started) waits for the group the
  others see instead of closing on the first two and splitting the round.
- **Groups**: the ready peers, ordered by a hash of (round key, peer), are cut into
  ``ceil(n / max_group_size)`` groups of near-equal size; every group gets at least one
  peer that can reduce (not in client mode) or the peers left without one join the others,
  as long as that keeps groups within ``max_group_size``; the clients that do not fit skip
  the round. Every peer that sees the same announcements computes the same groups.
- **Across groups**: a round cut into several groups (more ready peers than
  ``max_group_size``) averages in two stages, each group first, then
  :func:`cross_groups`: "columns" of a few members each, one or two from every group, that
  average their groups' means. Each member tags its group's mean with the set of that
  group's contributors (:func:`members_tag`, a bitmap over :func:`round_order`), so the
  members of one group count once in a column (see ``Contribution.tag``) and the result is
  the mean over every group's contributors, weighted by samples, as one group would give.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from shoal.errors import ConfigError
from shoal.parallel.data.messages import MAX_TAG_BYTES

__all__ = [
    "FormationConfig",
    "FormationEstimator",
    "Group",
    "ReadyPeer",
    "cross_groups",
    "form_groups",
    "members_tag",
    "round_order",
    "tag_members",
    "window_closed",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class FormationConfig:
    """Window-length estimator settings."""

    initial_s: float = 5.0
    """Window length before any round has been observed."""
    floor_s: float = 0.5
    """Never wait less than this for peers to gather."""
    cap_s: float = 60.0
    """Never wait longer than this."""
    smoothing: float = 0.25
    """EWMA weight of the newest observation, in (0, 1]."""
    deviation_factor: float = 4.0
    """How many mean deviations of margin the window adds."""

    def __post_init__(self) -> None:
        if not 0 < self.floor_s <= self.cap_s:
            raise ConfigError(f"need 0 < floor_s <= cap_s, got {self.floor_s!r}, {self.cap_s!r}")
        if not self.floor_s <= self.initial_s <= self.cap_s:
            raise ConfigError(f"initial_s must lie in [floor_s, cap_s], got {self.initial_s!r}")
        if not 0 < self.smoothing <= 1:
            raise ConfigError(f"smoothing must be in (0, 1], got {self.smoothing!r}")
        if self.deviation_factor < 0:
            raise ConfigError(f"deviation_factor must be >= 0, got {self.deviation_factor!r}")


class FormationEstimator:
    """EWMA of observed window fill times -> the next window length (seconds)."""

    def __init__(self, config: FormationConfig | None = None) -> None:
        self.config = config or FormationConfig()
        self.mean_s: float | None = None
        self.deviation_s = 0.0

    def observe(self, fill_time_s: float) -> None:
        """Record how long a window took until every expected peer was ready (windows that
        ran out are not observed: they only bound the fill time from below)."""
        if not math.isfinite(fill_time_s) or fill_time_s < 0:
            return
        a = self.config.smoothing
        if self.mean_s is None:
            self.mean_s = fill_time_s
            self.deviation_s = fill_time_s / 2
            return
        self.deviation_s = (1 - a) * self.deviation_s + a * abs(fill_time_s - self.mean_s)
        self.mean_s = (1 - a) * self.mean_s + a * fill_time_s

    def window_s(self, at_least_s: float = 0.0) -> float:
        """How long the next window stays open at most; ``at_least_s`` raises the floor
        for this window (still within the cap)."""
        c = self.config
        proposed = c.initial_s
        if self.mean_s is not None:
            proposed = self.mean_s + c.deviation_factor * self.deviation_s
        return min(c.cap_s, max(c.floor_s, at_least_s, proposed))


def window_closed(
    *, now: float, opened_at: float, window_s: float, n_ready: int, expected_peers: int
) -> bool:
    """True once everyone expected is ready or the window has run out."""
    return n_ready >= expected_peers or now >= opened_at + window_s


NONCE_BYTES = 8
"""Random bytes each matchmaking attempt announces (and hashes into its group ids)."""


@dataclass(frozen=True, slots=True)
class ReadyPeer:
    """One announcement on the board."""

    peer: bytes
    """The peer's id (raw bytes)."""
    weight: float
    """Samples it contributes this round."""
    uplink_bps: float
    """Measured upload rate; with the download it sets its share of the reduction."""
    client_mode: bool = False
    """True when it cannot accept connections or is too slow to reduce."""
    address: str = ""
    """Where its Averaging service is reached (``host:port``); empty for clients."""
    expected: int = 0
    """How many ready peers it waits for (its membership view); 0 = no opinion."""
    nonce: bytes = b""
    """Random per matchmaking attempt (``NONCE_BYTES``): group ids hash it, so
    entries and confirmations of an earlier attempt under the same key never match."""
    downlink_bps: float = 0.0
    """Measured download rate; 0 = not measured (taken as the upload)."""
    closed: bool = field(default=False, compare=False)
    """Its window ran out and it goes with who came: peers still waiting close theirs at
    their next read (not part of group ids, nor of what makes two entries equal)."""


@dataclass(frozen=True, slots=True)
class Group:
    """One all-reduce group: ordered members and the id every member derives alike."""

    group_id: bytes
    members: tuple[ReadyPeer, ...]
    round_groups: tuple[Group, ...] = field(default=(), compare=False)
    """Every group the round was cut into, as derived from the board (this one's members
    before confirmation among them), when there are several: the round goes on across
    them (:func:`cross_groups`)."""
    confirmed_id: bytes = field(default=b"", compare=False)
    """The id of the group its members confirmed, when only some of them did and this
    group is those (empty: this is the group they confirmed)."""


def _order_key(round_key: bytes, peer: bytes) -> bytes:
    return hashlib.blake2b(round_key + b"\0" + peer, digest_size=16).digest()


def _group_id(round_key: bytes, members: Sequence[ReadyPeer]) -> bytes:
    """Hash of everything members must agree on: who, which attempt (nonce), and what sets
    the shares (links, client mode). Two views of one entry give two ids."""
    digest = hashlib.blake2b(round_key, digest_size=16)
    for p in members:
        digest.update(p.peer)
        digest.update(bytes([len(p.nonce)]) + p.nonce)
        digest.update(struct.pack("<dd?", p.uplink_bps, p.downlink_bps, p.client_mode))
    return digest.digest()


def form_groups(
    round_key: bytes, ready: Sequence[ReadyPeer], *, max_group_size: int, min_group_size: int = 2
) -> list[Group]:
    """Cut the ready peers into groups (see module docstring); groups below
    ``min_group_size`` are dropped (those peers skip the round)."""
    if max_group_size < 1 or min_group_size < 1:
        raise ConfigError(f"group sizes must be >= 1, got {max_group_size}, {min_group_size}")
    unique = {p.peer: p for p in ready}
    ordered = sorted(unique.values(), key=lambda p: _order_key(round_key, p.peer))
    n = len(ordered)
    if n == 0:
        return []
    n_groups = math.ceil(n / max_group_size)
    servers = [p for p in ordered if not p.client_mode]
    clients = [p for p in ordered if p.client_mode]
    n_groups = max(1, min(n_groups, len(servers))) if servers else 1
    # No more groups than min_group_size fills: 11 peers in groups of 8 to 8 made two
    # buckets of 6 and 5, and no one averaged, where one group of 8 fits.
    n_groups = max(1, min(n_groups, n // min_group_size))
    # Groups stay within max_group_size even when few peers can reduce: the clients that
    # do not fit (last in this key's order; the next round's key orders them anew) skip.
    seated = (servers + clients)[: n_groups * max_group_size]
    buckets: list[list[ReadyPeer]] = [[] for _ in range(n_groups)]
    for i, p in enumerate(seated):
        buckets[i % n_groups].append(p)
    groups = []
    for bucket in buckets:
        if len(bucket) < min_group_size or not any(not p.client_mode for p in bucket):
            continue
        members = tuple(sorted(bucket, key=lambda p: _order_key(round_key, p.peer)))
        groups.append(Group(_group_id(round_key, members), members))
    return groups


def cross_groups(round_key: bytes, groups: Sequence[Group], *, max_group_size: int) -> list[Group]:
    """The second stage of a round cut into ``groups``: columns that average the groups'
    means (empty for fewer than two groups).

    Member ``i`` of each group (reducers first) goes to column ``i mod w``, ``w`` the size
    of the smallest group, so every column holds one or two members of every group. A
    column without a reducer joins one that has one, within ``max_group_size``; its members
    skip the second stage otherwise. Every peer deriving the same groups derives the same
    columns.
    """
    if len(groups) < 2 or len(round_order(groups)) > 8 * MAX_TAG_BYTES:
        return []
    width = min(len(g.members) for g in groups)
    columns: list[list[ReadyPeer]] = [[] for _ in range(width)]
    for g in groups:
        for i, p in enumerate(sorted(g.members, key=lambda p: p.client_mode)):
            columns[i % width].append(p)
    served = [c for c in columns if any(not p.client_mode for p in c)]
    unserved = [c for c in columns if all(p.client_mode for p in c)]
    for k, column in enumerate(unserved):
        target = served[k % len(served)]  # column 0 holds every group's first reducer
        if len(target) + len(column) <= max_group_size:
            target.extend(column)
    key = round_key + b"/across"
    ordered = (tuple(sorted(c, key=lambda p: _order_key(key, p.peer))) for c in served)
    return [Group(_group_id(key, members), members) for members in ordered]


def round_order(groups: Sequence[Group]) -> tuple[bytes, ...]:
    """Every member of ``groups``, in order: the positions :func:`members_tag` marks."""
    return tuple(p.peer for g in groups for p in g.members)


def members_tag(order: Sequence[bytes], peers: Iterable[bytes]) -> bytes:
    """A bitmap of the positions of ``peers`` in ``order`` (peers not in it are ignored)."""
    index = {peer: i for i, peer in enumerate(order)}
    bits = bytearray(-(-len(order) // 8))
    for peer in peers:
        i = index.get(peer)
        if i is not None:
            bits[i // 8] |= 1 << (i % 8)
    return bytes(bits)


def tag_members(order: Sequence[bytes], tag: bytes) -> set[bytes]:
    """The peers of ``order`` whose positions ``tag`` marks (bits past it are ignored)."""
    return {
        peer for i, peer in enumerate(order) if i // 8 < len(tag) and tag[i // 8] >> (i % 8) & 1
    }
