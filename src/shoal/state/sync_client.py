"""Joiner side of state sync: download a snapshot from several donors in parallel.

    result = await sync_from_swarm(runtime, dht, state_key("main"))      # on the loop
    result = runtime.run(sync_from_swarm(...), timeout_s=...)           # compute thread

Steps: read the donors' announcements from the DHT and ``choose_donors`` (freshest step,
most-held version, up to ``max_donors``); fetch and ``check_manifest`` each donor's manifest
of that version; preallocate every destination tensor once; split the bytes into pieces of
``piece_bytes`` (``plan_pieces``) that ``streams_per_donor`` workers per donor pull from one
queue, so faster donors take more. Every chunk is checked against the manifest's xxHash3
and copied straight into its destination; in-flight data is bounded by the number of
streams times gRPC's flow-control window. A donor that fails (gone, stalled past
``piece_timeout_s``, bad checksum) gives its unfinished chunks back to the queue and a spare
donor of the same version takes its place; the download fails only when no donor is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash

from shoal.errors import (
    ConfigError,
    NetworkError,
    PeerTimeout,
    PeerUnavailable,
    ProtocolViolation,
    RemoteError,
)
from shoal.net.aio import within
from shoal.net.config import MiB
from shoal.net.proto.v1 import state_pb2, state_pb2_grpc
from shoal.net.tensors import Chunk, tensor_bytes
from shoal.state.announce import Announcement, DonorChoice, choose_donors, parse_announcements
from shoal.state.checkpoint import Snapshot
from shoal.state.snapshot import ManifestLimits, assemble, check_manifest, empty_tensors

__all__ = [
    "Piece",
    "SyncConfig",
    "SyncResult",
    "download",
    "find_donors",
    "plan_pieces",
    "sync_from_swarm",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class SyncConfig:
    """How a joiner downloads state."""

    max_donors: int = 3
    """Donors downloaded from at once."""
    streams_per_donor: int = 2
    """Concurrent Fetch streams per donor (hides the gap between pieces)."""
    piece_bytes: int = 32 * MiB
    """Bytes one Fetch asks for (the unit of work handed to a donor)."""
    dht_timeout_s: float = 15.0
    """Deadline of reading the announcements."""
    manifest_timeout_s: float = 10.0
    """Deadline of one Manifest call."""
    piece_timeout_s: float = 120.0
    """Deadline of one Fetch (a stalled donor is dropped after it)."""
    total_timeout_s: float = 1800.0
    """Deadline of the whole download."""
    limits: ManifestLimits = field(default_factory=ManifestLimits)

    def __post_init__(self) -> None:
        for name in ("max_donors", "streams_per_donor", "piece_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"SyncConfig.{name} must be a positive int, got {value!r}")
        for name in ("dht_timeout_s", "manifest_timeout_s", "piece_timeout_s", "total_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"SyncConfig.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True, slots=True)
class Piece:
    """Chunks to fetch in one call: (tensor index, byte offset, byte count), in order."""

    chunks: tuple[tuple[int, int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(n for _, _, n in self.chunks)

    def segments(self) -> list[state_pb2.Segment]:
        out: list[state_pb2.Segment] = []
        for tensor, pos, n in self.chunks:
            last = out[-1] if out else None
            if last is not None and last.tensor == tensor and last.end == pos:
                last.end = pos + n
            else:
                out.append(state_pb2.Segment(tensor=tensor, start=pos, end=pos + n))
        return out


def plan_pieces(
    manifest: state_pb2.StateManifest, piece_bytes: int, tensors: list[int] | None = None
) -> list[Piece]:
    """Every chunk of every tensor (or of the ``tensors`` indices), grouped in order into
    pieces of about ``piece_bytes``."""
    chunk = manifest.chunk_bytes
    pieces: list[Piece] = []
    current: list[tuple[int, int, int]] = []
    size = 0
    indices = range(len(manifest.tensors)) if tensors is None else tensors
    for index in indices:
        t = manifest.tensors[index]
        for pos in range(0, t.byte_length, chunk):
            n = min(chunk, t.byte_length - pos)
            current.append((index, pos, n))
            size += n
            if size >= piece_bytes:
                pieces.append(Piece(tuple(current)))
                current, size = [], 0
    if current:
        pieces.append(Piece(tuple(current)))
    return pieces


@dataclass(slots=True)
class SyncResult:
    snapshot: Snapshot
    manifest: state_pb2.StateManifest
    bytes_by_donor: dict[str, int]
    failed_donors: list[str]
    seconds: float


class _Transfer:
    """The shared queue of pieces and where received bytes go."""

    def __init__(
        self, manifest: state_pb2.StateManifest, pieces: list[Piece], wanted: list[int]
    ) -> None:
        self.manifest = manifest
        self.tensors = empty_tensors(manifest, only=set(wanted))  # none for unfetched ones
        self.views = [tensor_bytes(t) for t in self.tensors]
        self.sums = [list(t.chunk_checksums) for t in manifest.tensors]
        self.queue: deque[Piece] = deque(pieces)
        self.active = 0
        self.cond = asyncio.Condition()

    async def next_piece(self) -> Piece | None:
        async with self.cond:
            await self.cond.wait_for(lambda: bool(self.queue) or self.active == 0)
            if not self.queue:
                return None
            self.active += 1
            return self.queue.popleft()

    async def settle(self, rest: Piece | None) -> None:
        async with self.cond:
            self.active -= 1
            if rest is not None and rest.chunks:
                self.queue.appendleft(rest)
            self.cond.notify_all()

    @property
    def done(self) -> bool:
        return not self.queue and self.active == 0

    def accept(self, frame: Any, expected: tuple[int, int, int]) -> None:
        if isinstance(frame, Chunk):
            data = frame.data
        elif frame.WhichOneof("frame") == "chunk":
            data = memoryview(frame.chunk)
        else:
            raise ProtocolViolation("Fetch answered a frame that is not a chunk")
        tensor, pos, n = expected
        if data.nbytes != n:
            raise ProtocolViolation(f"chunk of {data.nbytes} bytes, expected {n}")
        chunk = self.manifest.chunk_bytes
        if xxhash.xxh3_64_intdigest(data) != self.sums[tensor][pos // chunk]:
            name = self.manifest.tensors[tensor].name
            raise ProtocolViolation(f"checksum mismatch in {name} at byte {pos}")
        self.views[tensor][pos : pos + n] = data


class _Downloader:
    def __init__(
        self,
        runtime: Any,
        choice: DonorChoice,
        config: SyncConfig,
        on_chunk: Callable[[str, int], None] | None,
        only: Callable[[str], bool] | None = None,
    ) -> None:
        self.runtime = runtime
        self.on_chunk = on_chunk
        self.only = only
        self.choice = choice
        self.config = config
        self.candidates: deque[Announcement] = deque([*choice.donors, *choice.spares])
        self.manifest: state_pb2.StateManifest | None = None
        self.bytes_by_donor: dict[str, int] = {}
        self.failed: list[str] = []

    def _stub(self, donor: Announcement) -> Any:
        return self.runtime.stub(state_pb2_grpc.StateStub, donor.address, peer_id=donor.peer_id)

    async def _manifest_of(self, donor: Announcement) -> state_pb2.StateManifest | None:
        """The donor's manifest of the target version, or None (logged) when it has none."""
        stub, cfg = self._stub(donor), self.config
        want = self.manifest.version if self.manifest is not None else self.choice.version
        try:
            try:
                m = await stub.Manifest(
                    state_pb2.ManifestRequest(version=want), timeout_s=cfg.manifest_timeout_s
                )
            except NetworkError as exc:
                if self.manifest is not None or not isinstance(exc, RemoteError):
                    raise
                # the donor moved on since it announced: take its newer snapshot instead
                m = await stub.Manifest(
                    state_pb2.ManifestRequest(), timeout_s=cfg.manifest_timeout_s
                )
                if m.step < self.choice.step or m.version in self.choice.skip:
                    return None
            check_manifest(m, cfg.limits)
        except NetworkError as exc:
            log.warning("donor %s gave no usable manifest: %s", donor.peer_id.short(), exc)
            self.failed.append(donor.peer_id.short())
            return None
        if self.manifest is not None and m.version != self.manifest.version:
            return None
        manifest: state_pb2.StateManifest = m
        return manifest

    async def _next_donor(self) -> Announcement | None:
        while self.candidates:
            donor = self.candidates.popleft()
            manifest = await self._manifest_of(donor)
            if manifest is not None:
                self.manifest = self.manifest or manifest
                return donor
        return None

    async def _worker(self, donor: Announcement, transfer: _Transfer) -> bool:
        """Pull pieces until none is left (True) or the donor fails (False)."""
        stub, label = self._stub(donor), donor.peer_id.short()
        while (piece := await transfer.next_piece()) is not None:
            got = 0
            try:
                request = state_pb2.FetchRequest(version=transfer.manifest.version)
                request.segments.extend(piece.segments())
                stream = stub.Fetch(request, timeout_s=self.config.piece_timeout_s)
                async with contextlib.aclosing(stream):
                    async for frame in stream:
                        if got >= len(piece.chunks):
                            raise ProtocolViolation("Fetch sent more chunks than asked for")
                        transfer.accept(frame, piece.chunks[got])
                        done = self.bytes_by_donor.get(label, 0) + piece.chunks[got][2]
                        self.bytes_by_donor[label] = done
                        got += 1
                        if self.on_chunk is not None:
                            self.on_chunk(label, done)
                if got != len(piece.chunks):
                    raise ProtocolViolation(f"Fetch ended after {got} of {len(piece.chunks)}")
            except (NetworkError, asyncio.TimeoutError) as exc:
                rest = Piece(piece.chunks[got:])
                log.warning(
                    "donor %s failed mid-transfer (%s); reassigning %d bytes",
                    label,
                    exc,
                    rest.nbytes,
                )
                await transfer.settle(rest)
                return False
            await transfer.settle(None)
        return True

    async def run(self) -> SyncResult:
        start = time.monotonic()
        cfg = self.config
        donors: list[Announcement] = []
        while len(donors) < cfg.max_donors and (donor := await self._next_donor()) is not None:
            donors.append(donor)
        if self.manifest is None:
            raise PeerUnavailable(f"no donor serves the snapshot of step {self.choice.step}")
        manifest = self.manifest
        wanted = [
            i for i, t in enumerate(manifest.tensors) if self.only is None or self.only(t.name)
        ]
        transfer = _Transfer(manifest, plan_pieces(manifest, cfg.piece_bytes, wanted), wanted)
        tasks: dict[asyncio.Task[bool], Announcement] = {}

        def launch(donor: Announcement) -> None:
            for _ in range(cfg.streams_per_donor):
                tasks[asyncio.ensure_future(self._worker(donor, transfer))] = donor

        for donor in donors:
            launch(donor)
        try:
            while not transfer.done:
                if not tasks:
                    raise PeerUnavailable("every donor failed before the snapshot was complete")
                finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    donor = tasks.pop(task)
                    if not task.result() and donor not in tasks.values():
                        self.failed.append(donor.peer_id.short())
                        spare = await self._next_donor()
                        if spare is not None:
                            log.info("continuing with donor %s", spare.peer_id.short())
                            launch(spare)
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=2.0)
        if len(wanted) < len(manifest.tensors):  # the snapshot holds what was fetched
            manifest = state_pb2.StateManifest()
            manifest.CopyFrom(self.manifest)
            del manifest.tensors[:]
            manifest.tensors.extend(self.manifest.tensors[i] for i in wanted)
        return SyncResult(
            snapshot=assemble(manifest, [transfer.tensors[i] for i in wanted]),
            manifest=self.manifest,
            bytes_by_donor=self.bytes_by_donor,
            failed_donors=self.failed,
            seconds=time.monotonic() - start,
        )


async def download(
    runtime: Any,
    choice: DonorChoice,
    config: SyncConfig | None = None,
    *,
    on_chunk: Callable[[str, int], None] | None = None,
    only: Callable[[str], bool] | None = None,
) -> SyncResult:
    """Download the snapshot ``choice`` names (on the runtime's loop).

    ``on_chunk(donor, bytes_from_donor)`` runs on the loop after each verified chunk.
    ``only(name)`` selects tensors by manifest name (``"<file stem>/<key>"``); the result
    then holds only those (a DiLoCo peer catching up needs the outer state, not the model
    and AdamW moments that make up most of a snapshot).

    Raises:
        PeerUnavailable: no donor could serve it to the end.
        PeerTimeout: ``total_timeout_s`` passed.
    """
    config = config or SyncConfig()

    async def first_that_serves() -> SyncResult:
        failed: list[str] = []
        for option in (choice, *choice.fallbacks):
            try:
                return await _Downloader(runtime, option, config, on_chunk, only).run()
            except PeerUnavailable as exc:  # every donor of it failed: the next snapshot
                log.warning("snapshot of step %d unavailable: %s", option.step, exc)
                failed.append(f"step {option.step}: {exc}")
        raise PeerUnavailable(
            "no announced snapshot could be downloaded (" + "; ".join(failed) + ")"
        )

    try:
        return await within(first_that_serves(), config.total_timeout_s)
    except asyncio.TimeoutError:
        raise PeerTimeout(f"state sync did not finish within {config.total_timeout_s} s") from None


async def find_donors(
    dht: Any,
    key: bytes,
    config: SyncConfig,
    exclude: Any = None,
    ahead_of: Sequence[int] | None = None,
    tag_below: str | None = None,
    skip: Collection[str] = (),
) -> DonorChoice | None:
    """Read the announcements under ``key`` and choose donors (None when nobody announces,
    or, with ``ahead_of``, when no snapshot is ahead of those progress counts, nor tied
    with them under a tag below ``tag_below``, or every one is of a version in ``skip``:
    see ``choose_donors``)."""
    value = await within(dht.node.get(key), config.dht_timeout_s)
    return choose_donors(
        parse_announcements(value),
        exclude=exclude,
        skip=skip,
        max_donors=config.max_donors,
        ahead_of=ahead_of,
        tag_below=tag_below,
    )


async def sync_from_swarm(
    runtime: Any,
    dht: Any,
    key: bytes,
    config: SyncConfig | None = None,
    *,
    on_chunk: Callable[[str, int], None] | None = None,
) -> SyncResult:
    """Find the freshest snapshot announced under ``key`` and download it.

    Raises:
        PeerUnavailable: nobody announces a snapshot, or no donor could serve it.
        PeerTimeout: the DHT read or the download passed its deadline.
    """
    config = config or SyncConfig()
    try:
        choice = await find_donors(dht, key, config, exclude=runtime.peer_id)
    except asyncio.TimeoutError:
        raise PeerTimeout("reading state announcements timed out") from None
    if choice is None:
        raise PeerUnavailable("no peer announces a state snapshot")
    return await download(runtime, choice, config, on_chunk=on_chunk)
