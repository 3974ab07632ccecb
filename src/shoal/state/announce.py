"""Donor announcements in the DHT, and the pure choice of donors a joiner downloads from.

Every donor stores, under ``state_key(swarm)`` with its own PeerID as subkey, a small msgpack
map ``{"s": step, "v": version, "a": address, "b": total_bytes}`` (plus ``"p"``, the
snapshot's progress counts, and ``"t"``, the tag of the state they reached, when its
strategy keeps them) that expires after
``ttl_s`` and is refreshed every ``ttl_s / 3`` and whenever a newer snapshot is ready
(``StateAnnouncer``). A joiner reads the dictionary, drops malformed entries
(``parse_announcements``), and ``choose_donors`` picks the freshest step, the version most
donors hold at that step, and up to ``max_donors`` of them; the others stay as spares, and
the next snapshots in that order are fallbacks for when none of them can serve.
A snapshot the caller downloaded and could not use (``RefusedVersions``: its meta or
tensors do not fit) is skipped by version from then on, so the next ask finds another.

Steps are each peer's own count and drift apart between peers; progress counts (e.g. the
rounds each streaming fragment applied) compare across peers. A peer that may have missed
a round asks ``choose_donors(ahead_of=its counts)`` for a snapshot ahead of it somewhere.
Peers with equal counts under different tags diverged (two sides of a healed partition
applied as many rounds each): ``tag_below=its tag`` also finds the snapshots with the
same counts and a smaller tag, an order every peer agrees on, so one side joins the other.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import msgpack

from shoal.errors import ConfigError, ShoalError
from shoal.net.aio import within
from shoal.net.identity import PEER_ID_BYTES, PeerID
from shoal.state.snapshot import MAX_PROGRESS, ServedSnapshot, valid_progress, valid_tag

__all__ = [
    "Announcement",
    "DonorChoice",
    "RefusedVersions",
    "StateAnnouncer",
    "choose_donors",
    "encode_announcement",
    "parse_announcements",
    "state_key",
]

log = logging.getLogger(__name__)
_MAX_VALUE_BYTES = 1024
_MAX_ADDRESS_CHARS = 256
_MAX_VERSION_CHARS = 64


def state_key(swarm: str, scope: str = "") -> bytes:
    """The DHT key donors of ``swarm`` announce under; a ``scope`` (e.g. a training mode)
    keeps snapshots that cannot restore each other apart, so the freshest announcement a
    joiner finds is one it can use."""
    return b"shoal.state/" + swarm.encode("utf-8") + (b"/" + scope.encode() if scope else b"")


@dataclass(frozen=True, slots=True)
class Announcement:
    """One donor's newest servable snapshot."""

    peer_id: PeerID
    step: int
    version: str
    address: str
    total_bytes: int
    progress: tuple[int, ...] | None = None
    """The snapshot's progress counts (None: its strategy keeps none)."""
    progress_tag: str | None = None
    """The tag of the state those counts reached (None: none announced)."""


def encode_announcement(
    step: int,
    version: str,
    address: str,
    total_bytes: int,
    progress: Sequence[int] | None = None,
    progress_tag: str | None = None,
) -> bytes:
    doc: dict[str, Any] = {"s": step, "v": version, "a": address, "b": total_bytes}
    if progress is not None:
        if not valid_progress(progress):
            raise ConfigError(f"progress must be 1 to {MAX_PROGRESS} ints in [0, 2**53]")
        doc["p"] = list(progress)
    if progress_tag is not None:
        if progress is None or not valid_tag(progress_tag):
            raise ConfigError("a progress tag goes with progress counts, 1 to 64 ASCII chars")
        doc["t"] = progress_tag
    value: bytes = msgpack.packb(doc, use_bin_type=True)
    return value


def _parse_one(subkey: bytes, value: bytes) -> Announcement | None:
    if len(subkey) < PEER_ID_BYTES or not isinstance(value, bytes) or len(value) > _MAX_VALUE_BYTES:
        return None
    try:
        doc = msgpack.unpackb(
            value,
            raw=False,
            max_str_len=_MAX_ADDRESS_CHARS,
            max_map_len=8,
            max_array_len=MAX_PROGRESS,
        )
        step, version, address, total = doc["s"], doc["v"], doc["a"], doc["b"]
        progress, tag = doc.get("p"), doc.get("t")
    except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException):
        return None
    if progress is not None and not valid_progress(progress):
        return None
    if tag is not None and (progress is None or not valid_tag(tag)):
        return None
    if not (isinstance(step, int) and step >= 0 and isinstance(total, int) and total >= 0):
        return None
    if not (isinstance(version, str) and 0 < len(version) <= _MAX_VERSION_CHARS):
        return None
    if not (isinstance(address, str) and 0 < len(address) <= _MAX_ADDRESS_CHARS):
        return None
    try:
        peer_id = PeerID.from_bytes(subkey[:PEER_ID_BYTES])
    except Exception:  # not a valid public key
        return None
    counts = tuple(progress) if progress is not None else None
    return Announcement(peer_id, step, version, address, total, counts, tag)


def parse_announcements(value: bytes | Mapping[bytes, bytes] | None) -> list[Announcement]:
    """Well-formed announcements from a DHT ``get`` of the state key (others are dropped)."""
    if not isinstance(value, Mapping):
        return []
    found = [_parse_one(k, v) for k, v in value.items()]
    return [a for a in found if a is not None]


@dataclass(frozen=True, slots=True)
class DonorChoice:
    step: int
    version: str
    donors: list[Announcement]
    """Up to ``max_donors`` donors, in the order to use them."""
    spares: list[Announcement]
    """Further donors of the same version, tried when the chosen ones fail."""
    fallbacks: tuple[DonorChoice, ...] = ()
    """Other snapshots (other versions, then older steps), tried in order when no donor of
    this one can serve it: every peer's snapshot is its own version, so a dead donor
    would otherwise leave a joiner with nothing while others serve the same step."""
    skip: frozenset[str] = frozenset()
    """Versions the caller refused (``choose_donors(skip=...)``): a donor that moved on
    since it announced is not taken at a newer snapshot of one of them either."""

    def newer_than(self, step: int | None) -> DonorChoice:
        """This choice keeping only the fallbacks above ``step`` (all when None): a caller
        that already holds ``step`` gains nothing from older snapshots."""
        keep = tuple(f for f in self.fallbacks if step is None or f.step > step)
        return replace(self, fallbacks=keep)


class RefusedVersions(Collection[str]):
    """Versions of snapshots this peer downloaded and could not use, the newest
    ``capacity`` of them: ``choose_donors(skip=...)`` passes over them.

    Every ask would otherwise choose the same freshest snapshot again, whatever was wrong
    with it, and a peer that needs state would never get any. A version names the content
    (the manifest's hash), so a refused snapshot is skipped whoever serves it; bounded,
    because a donor can publish new versions without end (the oldest are forgotten).
    """

    def __init__(self, capacity: int = 64) -> None:
        if capacity < 1:
            raise ConfigError(f"RefusedVersions capacity must be >= 1, got {capacity!r}")
        self.capacity = capacity
        self._versions: OrderedDict[str, None] = OrderedDict()

    def add(self, version: str) -> None:
        if not version:  # a snapshot taken here, never announced
            return
        self._versions[version] = None
        self._versions.move_to_end(version)
        while len(self._versions) > self.capacity:
            self._versions.popitem(last=False)

    def __contains__(self, version: object) -> bool:
        return version in self._versions

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._versions))

    def __len__(self) -> int:
        return len(self._versions)


def choose_donors(
    announcements: list[Announcement],
    *,
    exclude: PeerID | None = None,
    skip: Collection[str] = (),
    max_donors: int = 3,
    max_fallbacks: int = 3,
    rng: random.Random | None = None,
    ahead_of: Sequence[int] | None = None,
    tag_below: str | None = None,
) -> DonorChoice | None:
    """Freshest step, then the version most donors hold (ties: smallest version string);
    the next ``max_fallbacks`` snapshots in that order go in ``fallbacks``.

    With ``ahead_of`` (the caller's progress counts), only snapshots whose counts are
    ahead of those somewhere are candidates, most rounds gained first, then by step; with
    ``tag_below`` too, so are snapshots of exactly those counts under a smaller tag (after
    every one ahead; the smallest tag first, where every diverged side ends up). Snapshots
    whose version is in ``skip`` are never chosen."""
    by_snapshot: dict[tuple[int, str], list[Announcement]] = {}
    gain: dict[tuple[int, str], int] = {}
    tag: dict[tuple[int, str], str] = {}  # of tied snapshots: the smallest is taken first
    for a in announcements:
        if (exclude is not None and a.peer_id == exclude) or a.version in skip:
            continue
        if ahead_of is not None:
            ahead = _rounds_ahead(a.progress, ahead_of)
            if ahead <= 0:
                if not _tied_below(a, ahead_of, tag_below):
                    continue
                tag[a.step, a.version] = a.progress_tag or ""
            gain[a.step, a.version] = ahead
        by_snapshot.setdefault((a.step, a.version), []).append(a)
    if not by_snapshot:
        return None
    ranked = sorted(
        by_snapshot,
        key=lambda sv: (-gain.get(sv, 0), tag.get(sv, ""), -sv[0], -len(by_snapshot[sv]), sv[1]),
    )
    rng = rng or random.Random()
    refused = frozenset(skip)
    choices = []
    for step, version in ranked[: 1 + max_fallbacks]:
        donors = sorted(by_snapshot[step, version], key=lambda a: a.peer_id.raw)
        rng.shuffle(donors)
        choices.append(
            DonorChoice(step, version, donors[:max_donors], donors[max_donors:], skip=refused)
        )
    return replace(choices[0], fallbacks=tuple(choices[1:]))


def _tied_below(a: Announcement, counts: Sequence[int], tag: str | None) -> bool:
    """``a`` reached exactly ``counts`` in a state tagged below ``tag``."""
    return (
        tag is not None
        and a.progress_tag is not None
        and a.progress == tuple(counts)
        and a.progress_tag < tag
    )


def _rounds_ahead(theirs: tuple[int, ...] | None, ours: Sequence[int]) -> int:
    """Rounds a snapshot with counts ``theirs`` holds that ``ours`` lacks (0: none, or
    counts of another shape)."""
    if theirs is None or len(theirs) != len(ours):
        return 0
    return sum(max(0, t - o) for t, o in zip(theirs, ours, strict=True))


class StateAnnouncer:
    """Keeps this peer's newest servable snapshot announced in the DHT (runs on the loop)."""

    def __init__(
        self,
        dht: Any,
        key: bytes,
        provider: Callable[[], ServedSnapshot | None],
        *,
        address: str,
        ttl_s: float = 30.0,
        store_timeout_s: float = 10.0,
    ) -> None:
        if not ttl_s > 3.0:
            raise ConfigError(f"StateAnnouncer ttl_s must be > 3, got {ttl_s!r}")
        self.dht = dht
        self.runtime = dht.runtime
        self.key = key
        self.provider = provider
        self.address = address
        self.ttl_s = ttl_s
        self.store_timeout_s = store_timeout_s
        self.announced_step: int | None = None
        self._wake: asyncio.Event | None = None
        self._future: concurrent.futures.Future[None] | None = None

    def start(self) -> StateAnnouncer:
        if self._future is None:
            self._future = self.runtime.submit(self._run())
        return self

    def notify(self) -> None:
        """A newer snapshot may be ready: announce it soon (any thread)."""
        wake = self._wake
        if wake is not None:
            self.runtime.loop.call_soon_threadsafe(wake.set)

    async def announce_once(self) -> bool:
        """Store the current snapshot's announcement; False when there is none yet."""
        served = self.provider()
        if served is None:
            return False
        value = encode_announcement(
            served.step,
            served.version,
            self.address,
            served.total_bytes,
            served.progress,
            served.progress_tag if served.progress is not None else None,
        )
        await within(
            self.dht.node.store(self.key, value, time.time() + self.ttl_s, subkey=b""),
            self.store_timeout_s,
        )
        self.announced_step = served.step
        return True

    async def _run(self) -> None:
        self._wake = asyncio.Event()
        period = self.ttl_s / 3
        while True:
            try:
                await self.announce_once()
            except (ShoalError, asyncio.TimeoutError) as exc:
                log.warning("state announcement failed: %s", exc)
            except Exception:  # a bug must not silently end the announcements
                log.exception("state announcement failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await within(self._wake.wait(), period)
            self._wake.clear()

    def close(self) -> None:
        """Stop announcing (the record expires by itself). Idempotent."""
        if self._future is not None:
            self._future.cancel()
            self._future = None
