"""``shoal.v1.State``: a donor serves immutable snapshots to joiners, in verified chunks.

    server = StateServer(runtime, checkpointer.latest_served)   # provider: () -> ServedSnapshot
    ...
    server.close()

``Manifest`` answers the newest snapshot (or a named version still held); ``Fetch`` streams
the raw bytes of the requested segments as ``TensorFrame`` chunks of ``chunk_bytes`` in
request order (the joiner checks each against the manifest's checksum). The service only
reads ``ServedSnapshot`` objects, CPU copies taken between steps, never live parameters, so
training goes on while it serves. A version stays held while the provider still returns it
or while it was used within ``pin_s``, so a transfer survives the donor's next snapshot.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from shoal.errors import ConfigError, ProtocolViolation, RemoteError
from shoal.net.proto.v1 import state_pb2, state_pb2_grpc
from shoal.net.tensors import Chunk
from shoal.state.snapshot import ServedSnapshot

__all__ = ["SERVICE_NAME", "ServeConfig", "StateServer", "StateService", "VersionCache"]

SERVICE_NAME = "shoal.v1.State"


@dataclass(frozen=True, kw_only=True, slots=True)
class ServeConfig:
    """Limits of the State service."""

    max_segments: int = 4096
    """Most segments one Fetch may ask for."""
    max_fetch_bytes: int = 1 << 30
    """Most bytes one Fetch may ask for."""
    pin_s: float = 120.0
    """An older version stays available this long after its last use."""
    max_versions: int = 3
    """Versions held at most (the provider's current one always among them)."""

    def __post_init__(self) -> None:
        for name in ("max_segments", "max_fetch_bytes", "pin_s", "max_versions"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"ServeConfig.{name} must be > 0, got {value!r}")


class VersionCache:
    """Which snapshots are held: the current one, plus older ones used within ``pin_s``."""

    def __init__(self, config: ServeConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._held: dict[str, tuple[ServedSnapshot, float]] = {}

    def update(self, current: ServedSnapshot | None) -> None:
        now = self._clock()
        if current is not None and current.version not in self._held:
            self._held[current.version] = (current, now)
        keep = current.version if current is not None else None
        pinned = [
            (used, v)
            for v, (_, used) in self._held.items()
            if v != keep and now - used <= self._config.pin_s
        ]
        pinned.sort(reverse=True)
        allowed = {v for _, v in pinned[: self._config.max_versions - 1]}
        if keep is not None:
            allowed.add(keep)
        self._held = {v: e for v, e in self._held.items() if v in allowed}

    def get(self, version: str, current: ServedSnapshot | None) -> ServedSnapshot | None:
        """The held snapshot of ``version`` ("" = the current one), marked as used now."""
        self.update(current)
        if not version:
            if current is None:
                return None
            version = current.version
        entry = self._held.get(version)
        if entry is None:
            return None
        self._held[version] = (entry[0], self._clock())
        return entry[0]

    @property
    def versions(self) -> list[str]:
        return list(self._held)


def _segment_bounds(
    snap: ServedSnapshot, segments: Any, config: ServeConfig
) -> list[tuple[int, int, int]]:
    if len(segments) > config.max_segments:
        raise ProtocolViolation(f"Fetch of {len(segments)} segments exceeds {config.max_segments}")
    chunk = snap.manifest.chunk_bytes
    out, total = [], 0
    for seg in segments:
        if seg.tensor >= len(snap.views):
            raise ProtocolViolation(f"Fetch names tensor {seg.tensor} of {len(snap.views)}")
        length = snap.views[seg.tensor].nbytes
        if seg.start % chunk or not seg.start < seg.end <= length:
            raise ProtocolViolation(f"Fetch segment [{seg.start}, {seg.end}) of {length} bytes")
        if seg.end % chunk and seg.end != length:
            raise ProtocolViolation(f"Fetch segment end {seg.end} is not on a chunk boundary")
        total += seg.end - seg.start
        out.append((seg.tensor, seg.start, seg.end))
    if total > config.max_fetch_bytes:
        raise ProtocolViolation(f"Fetch of {total} bytes exceeds {config.max_fetch_bytes}")
    return out


class StateService(state_pb2_grpc.StateServicer):
    """Handlers of ``shoal.v1.State`` over snapshots from ``provider``."""

    def __init__(
        self,
        provider: Callable[[], ServedSnapshot | None],
        config: ServeConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._provider = provider
        self.config = config or ServeConfig()
        self.cache = VersionCache(self.config, clock)
        self.bytes_served = 0

    def _find(self, version: str) -> ServedSnapshot:
        if len(version) > 64:
            raise ProtocolViolation("state version longer than 64 characters")
        snap = self.cache.get(version, self._provider())
        if snap is None:
            what = f"version {version}" if version else "a snapshot"
            raise RemoteError(f"this peer does not hold {what}")
        return snap

    async def Manifest(
        self, request: state_pb2.ManifestRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.StateManifest:
        return self._find(request.version).manifest

    async def Fetch(
        self, request: state_pb2.FetchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        snap = self._find(request.version)
        chunk = snap.manifest.chunk_bytes
        for index, start, end in _segment_bounds(snap, request.segments, self.config):
            view = snap.views[index]
            for pos in range(start, end, chunk):
                piece = view[pos : min(pos + chunk, end)]
                self.bytes_served += piece.nbytes
                yield Chunk(piece)


class StateServer:
    """The State service registered on a runtime; ``close()`` stops serving (idempotent)."""

    def __init__(
        self,
        runtime: Any,
        snapshot_provider: Callable[[], ServedSnapshot | None],
        config: ServeConfig | None = None,
    ) -> None:
        self.runtime = runtime
        self.service = StateService(snapshot_provider, config)
        runtime.add_servicer(state_pb2_grpc.add_StateServicer_to_server, self.service)
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.runtime.remove_service(SERVICE_NAME)
