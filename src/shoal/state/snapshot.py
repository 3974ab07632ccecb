"""A snapshot prepared for serving: flat named tensors, per-chunk checksums, a content version.

``prepare(snapshot)`` turns a ``checkpoint.Snapshot`` (CPU tensors, taken between steps) into
a ``ServedSnapshot``: every tensor (but those of the peer's own ``local`` file) under the
name ``"<file stem>/<key>"`` with its raw byte
view and the xxHash3-64 of every ``chunk_bytes`` slice, plus a ``shoal.v1.StateManifest``.
The manifest's ``version`` is a hash of everything else in it, so two donors holding the
same snapshot announce the same version and a joiner can recompute it to check a manifest.

``check_manifest`` validates a manifest received from the wire against ``ManifestLimits``
before anything is allocated; ``assemble`` turns received tensors back into a ``Snapshot``
and ``as_checkpoint`` into the ``LoadedCheckpoint`` that run restorers take.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from shoal.errors import CheckpointError, ConfigError, ProtocolViolation
from shoal.net.config import MiB
from shoal.net.proto.v1 import state_pb2
from shoal.net.tensors import DTYPES, tensor_bytes
from shoal.state.checkpoint import LOCAL_STEM, LoadedCheckpoint, Snapshot
from shoal.state.tensor_dicts import unflatten_optimizer_state

__all__ = [
    "ManifestLimits",
    "ServedSnapshot",
    "as_checkpoint",
    "assemble",
    "check_manifest",
    "chunk_count",
    "empty_tensors",
    "manifest_version",
    "prepare",
]

_TORCH_TO_ENUM = {dt: enum for _, (enum, dt) in DTYPES.items()}
_ENUM_TO_TORCH = {enum: dt for _, (enum, dt) in DTYPES.items()}
_OPTIM_META_KEY = "shoal.optimizer"


@dataclass(frozen=True, kw_only=True, slots=True)
class ManifestLimits:
    """What a joiner accepts in a donor's manifest (checked before allocating)."""

    max_total_bytes: int = 64 << 30
    """Largest snapshot, all tensors together."""
    max_tensors: int = 65536
    """Most tensors in one snapshot."""
    max_name_chars: int = 512
    """Longest tensor name."""
    max_dims: int = 8
    """Most dimensions of one tensor."""
    max_meta_chars: int = 4 * MiB
    """Longest ``meta_json``."""

    def __post_init__(self) -> None:
        for name in ("max_total_bytes", "max_tensors", "max_name_chars", "max_dims"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"ManifestLimits.{name} must be a positive int, got {value!r}")


MAX_PROGRESS = 64
"""Most progress counts a snapshot announces (e.g. one per streaming fragment)."""


def valid_progress(counts: Any) -> bool:
    """Whether ``counts`` can be announced: a list of 1 to 64 ints in [0, 2**53]."""
    return (
        isinstance(counts, (list, tuple))
        and 0 < len(counts) <= MAX_PROGRESS
        and all(type(c) is int and 0 <= c <= 2**53 for c in counts)
    )


MAX_TAG_CHARS = 64
"""Longest progress tag a snapshot announces."""


def valid_tag(tag: Any) -> bool:
    """Whether ``tag`` can be announced as a progress tag: 1 to 64 printable ASCII chars."""
    return (
        isinstance(tag, str)
        and 0 < len(tag) <= MAX_TAG_CHARS
        and tag.isascii()
        and tag.isprintable()
    )


def chunk_count(byte_length: int, chunk_bytes: int) -> int:
    return -(-byte_length // chunk_bytes)


@dataclass(frozen=True, slots=True)
class ServedSnapshot:
    """An immutable snapshot a donor serves; ``views[i]`` are the raw bytes of tensor i."""

    manifest: state_pb2.StateManifest
    tensors: tuple[torch.Tensor, ...]
    views: tuple[memoryview, ...]
    progress: tuple[int, ...] | None = None
    """The snapshot's progress counts (``meta["progress"]``), announced with it: they
    compare across peers where steps do not (see ``shoal.state.announce``)."""
    progress_tag: str | None = None
    """Names the state those counts reached (``meta["progress_tag"]``, e.g. a hash of
    DiLoCo's outer parameters): equal counts under different tags are diverged states."""

    @property
    def step(self) -> int:
        return int(self.manifest.step)

    @property
    def version(self) -> str:
        return str(self.manifest.version)

    @property
    def total_bytes(self) -> int:
        return int(self.manifest.total_bytes)


def manifest_version(manifest: state_pb2.StateManifest) -> str:
    """The content hash of ``manifest`` (its ``version`` field excluded)."""
    copy = state_pb2.StateManifest()
    copy.CopyFrom(manifest)
    copy.version = ""
    return str(xxhash.xxh3_128_hexdigest(copy.SerializeToString(deterministic=True)))


def prepare(snapshot: Snapshot, *, chunk_bytes: int = MiB) -> ServedSnapshot:
    """Index ``snapshot`` for serving (checksums every byte once; run off the compute thread).

    The snapshot's tensors are shared, not copied: the caller must never modify them.
    """
    if not 0 < chunk_bytes <= MiB:
        raise ConfigError(f"chunk_bytes must be in (0, 1 MiB], got {chunk_bytes!r}")
    manifest = state_pb2.StateManifest(step=snapshot.step, chunk_bytes=chunk_bytes)
    tensors: list[torch.Tensor] = []
    views: list[memoryview] = []
    total = 0
    stems = sorted(snapshot.files.keys() - {LOCAL_STEM})  # a peer's own file is not served
    for stem in stems:
        for key in sorted(snapshot.files[stem]):
            tensor = snapshot.files[stem][key].detach().contiguous()
            if tensor.device.type != "cpu" or tensor.dtype not in _TORCH_TO_ENUM:
                raise CheckpointError(f"snapshot tensor {stem}/{key} cannot be served")
            view = tensor_bytes(tensor)
            sums = [
                xxhash.xxh3_64_intdigest(view[i : i + chunk_bytes])
                for i in range(0, view.nbytes, chunk_bytes)
            ]
            manifest.tensors.append(
                state_pb2.StateTensor(
                    name=f"{stem}/{key}",
                    dtype=_TORCH_TO_ENUM[tensor.dtype],  # type: ignore[arg-type]
                    shape=list(tensor.shape),
                    byte_length=view.nbytes,
                    chunk_checksums=sums,
                )
            )
            tensors.append(tensor)
            views.append(view)
            total += view.nbytes
    manifest.total_bytes = total
    manifest.meta_json = json.dumps(
        {
            "meta": snapshot.meta,
            "file_meta": snapshot.file_meta,
            "stems": stems,
        },
        sort_keys=True,
    )
    manifest.version = manifest_version(manifest)
    counts: Any = snapshot.meta.get("progress")
    tag: Any = snapshot.meta.get("progress_tag")
    return ServedSnapshot(
        manifest=manifest,
        tensors=tuple(tensors),
        views=tuple(views),
        progress=tuple(counts) if valid_progress(counts) else None,
        progress_tag=tag if valid_tag(tag) else None,
    )


def check_manifest(manifest: state_pb2.StateManifest, limits: ManifestLimits) -> None:
    """Validate a manifest from the wire.

    Raises:
        ProtocolViolation: any bound broken, an inconsistent size or checksum count, a
            duplicate or malformed name, or a version that does not match the content.
    """
    chunk = manifest.chunk_bytes
    if not 0 < chunk <= MiB:
        raise ProtocolViolation(f"state manifest chunk_bytes {chunk} out of (0, 1 MiB]")
    if len(manifest.tensors) > limits.max_tensors:
        raise ProtocolViolation(f"state manifest lists {len(manifest.tensors)} tensors")
    if len(manifest.meta_json) > limits.max_meta_chars:
        raise ProtocolViolation(f"state manifest meta of {len(manifest.meta_json)} chars")
    if manifest.total_bytes > limits.max_total_bytes:
        raise ProtocolViolation(f"state snapshot of {manifest.total_bytes} bytes exceeds limit")
    names: set[str] = set()
    total = 0
    for t in manifest.tensors:
        if not 0 < len(t.name) <= limits.max_name_chars or "/" not in t.name or t.name in names:
            raise ProtocolViolation(f"state manifest has a bad or repeated name {t.name[:64]!r}")
        names.add(t.name)
        if t.name.startswith(f"{LOCAL_STEM}/"):  # a peer's own file: never any of ours
            raise ProtocolViolation(f"state manifest serves a peer's own file: {t.name[:64]!r}")
        dtype = _ENUM_TO_TORCH.get(t.dtype)
        if dtype is None or len(t.shape) > limits.max_dims:
            raise ProtocolViolation(f"state tensor {t.name!r}: bad dtype or dims")
        numel = 1
        for dim in t.shape:
            # Each dimension on its own too: a 0 keeps the product at 0, and torch.empty
            # then raises on a [0, 2**63] shape instead of refusing it.
            if dim > limits.max_total_bytes:
                raise ProtocolViolation(f"state tensor {t.name!r}: dimension {dim} too large")
            numel *= dim
            if numel > limits.max_total_bytes:
                raise ProtocolViolation(f"state tensor {t.name!r}: shape too large")
        if numel * torch.empty((), dtype=dtype).element_size() != t.byte_length:
            raise ProtocolViolation(f"state tensor {t.name!r}: shape and byte length disagree")
        if len(t.chunk_checksums) != chunk_count(t.byte_length, chunk):
            raise ProtocolViolation(f"state tensor {t.name!r}: wrong number of chunk checksums")
        total += t.byte_length
    if total != manifest.total_bytes:
        raise ProtocolViolation(f"state manifest total {manifest.total_bytes} != sum {total}")
    if manifest_version(manifest) != manifest.version:
        raise ProtocolViolation("state manifest version does not match its content")


def empty_tensors(
    manifest: state_pb2.StateManifest, only: set[int] | None = None
) -> list[torch.Tensor]:
    """Preallocated destinations for every tensor of a checked manifest (with ``only``,
    for those indices; the others are empty tensors of their dtype)."""
    return [
        torch.empty(
            tuple(t.shape) if only is None or i in only else (0,), dtype=_ENUM_TO_TORCH[t.dtype]
        )
        for i, t in enumerate(manifest.tensors)
    ]


def assemble(manifest: state_pb2.StateManifest, tensors: list[torch.Tensor]) -> Snapshot:
    """The ``Snapshot`` described by a checked manifest, with its received tensors."""
    try:
        doc = json.loads(manifest.meta_json or "{}")
        meta, file_meta = dict(doc.get("meta", {})), dict(doc.get("file_meta", {}))
        stems = [str(stem) for stem in doc.get("stems", [])]
    except (ValueError, TypeError, AttributeError) as exc:
        raise ProtocolViolation(f"state manifest meta is not a JSON object: {exc}") from exc
    files: dict[str, dict[str, torch.Tensor]] = {stem: {} for stem in stems}  # empty ones too
    for entry, tensor in zip(manifest.tensors, tensors, strict=True):
        stem, key = entry.name.split("/", 1)
        files.setdefault(stem, {})[key] = tensor
    return Snapshot(
        step=int(manifest.step),
        files=files,
        file_meta=file_meta,
        meta=meta,
        version=manifest.version,
    )


def as_checkpoint(snapshot: Snapshot, origin: str | Path) -> LoadedCheckpoint:
    """View a snapshot as the ``LoadedCheckpoint`` that ``restore_run`` takes.

    Raises:
        CheckpointError: the snapshot has no model, or optimizer tensors without metadata.
    """
    if "model" not in snapshot.files:
        raise CheckpointError(f"snapshot from {origin} has no model tensors")
    optimizer: dict[str, Any] | None = None
    if "optimizer" in snapshot.files:
        try:
            optim_meta = json.loads(snapshot.file_meta["optimizer"][_OPTIM_META_KEY])
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"snapshot from {origin} lacks optimizer metadata") from exc
        optimizer = unflatten_optimizer_state(snapshot.files["optimizer"], optim_meta)
    return LoadedCheckpoint(
        path=Path(str(origin)),
        step=snapshot.step,
        model=snapshot.files["model"],
        optimizer=optimizer,
        extra=snapshot.files.get("extra", {}),
        meta=snapshot.meta,
    )
