"""Checkpoints: safetensors files plus a JSON manifest, published by atomic rename.

Layout of a run's checkpoint folder::

    <root>/step-00000100/model.safetensors      model state dict
                         optimizer.safetensors  optimizer tensors (JSON part in its metadata)
                         extra.safetensors      other tensors (RNG states, data generator)
                         local.safetensors      this peer's own state (optional; never served)
                         manifest.json          step, meta, size + sha256 of every file above

Two phases, so writing can move off the training thread later: ``take_snapshot`` copies
everything to CPU tensors (must run on the training thread, between steps);
``write_snapshot`` only touches disk (safe on any thread). It writes into
``<root>/.tmp-step-...``, fsyncs, renames the folder to its final name and keeps the last K.

``read_checkpoint`` verifies every file's size and sha256 before parsing and raises
``CheckpointError`` naming the file. ``load_latest_valid`` walks from the newest checkpoint
back, logging and skipping torn or corrupt ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from shoal.errors import CheckpointError
from shoal.state.manifest import MANIFEST_NAME, FileEntry, Manifest, sha256_hex
from shoal.state.tensor_dicts import flatten_optimizer_state, unflatten_optimizer_state

__all__ = [
    "MAX_COUNT",
    "LoadedCheckpoint",
    "Snapshot",
    "is_generator_state",
    "list_checkpoints",
    "load_latest_valid",
    "meta_count",
    "meta_section",
    "read_checkpoint",
    "take_snapshot",
    "write_snapshot",
]

log = logging.getLogger(__name__)

_DIR_RE = re.compile(r"^step-(\d{8,})$")
_OPTIM_META_KEY = "shoal.optimizer"


MAX_COUNT = 2**53
"""The largest count a snapshot's meta may hold (every JSON reader keeps ints up to it)."""


def is_generator_state(state: object) -> bool:
    """Whether ``state`` can be a CPU generator's state (what ``set_state`` and
    ``set_rng_state`` take): a snapshot's tensors come from other peers too."""
    like = torch.get_rng_state()
    return (
        isinstance(state, torch.Tensor)
        and state.dtype == like.dtype
        and tuple(state.shape) == tuple(like.shape)
    )


def meta_count(meta: dict[str, Any], key: str, default: int) -> int:
    """``meta[key]`` as a count, ``default`` when absent. Meta comes from other peers too:
    ``int()`` of what it holds raised on null, lists, ``"x"`` or ``1e400``.

    Raises:
        CheckpointError: it is not an int in [0, 2**53] (a bool, a float, a string...).
    """
    value = meta.get(key, default)
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise CheckpointError(f"meta {key!r} is {_shown(value)}, not a count")
    return value


def meta_section(meta: dict[str, Any], key: str) -> dict[str, Any]:
    """``meta[key]``, a JSON object, or ``{}`` when absent.

    Raises:
        CheckpointError: it is something else.
    """
    value = meta.get(key, {})
    if not isinstance(value, dict):
        raise CheckpointError(f"meta {key!r} is {_shown(value)}, not an object")
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


LOCAL_STEM = "local"
"""The file of a peer's own state that no other peer should take (such as the error
feedback of compressed averaging: progress the swarm has not seen): written to disk, never
served, and never read from a donor's snapshot."""


@dataclass(kw_only=True, slots=True)
class Snapshot:
    """A checkpoint held in memory: CPU tensors and JSON metadata, nothing shared with training."""

    step: int
    files: dict[str, dict[str, torch.Tensor]]
    """File stem -> tensors (``model``, ``optimizer``, ``extra``, and ``local``)."""
    file_meta: dict[str, dict[str, str]] = field(default_factory=dict)
    """File stem -> safetensors string metadata."""
    meta: dict[str, Any] = field(default_factory=dict)
    """JSON-able metadata stored in the manifest."""
    version: str = ""
    """The version (manifest hash) it was downloaded as; empty for one taken here."""


@dataclass(kw_only=True, slots=True)
class LoadedCheckpoint:
    """A verified checkpoint read from disk."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    extra: dict[str, torch.Tensor]
    local: dict[str, torch.Tensor] = field(default_factory=dict)
    """The ``local`` file's tensors (``LOCAL_STEM``): from this peer's own disk only."""
    meta: dict[str, Any]


def _cpu_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def take_snapshot(
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: dict[str, torch.Tensor] | None = None,
    local: dict[str, torch.Tensor] | None = None,
    meta: dict[str, Any] | None = None,
) -> Snapshot:
    """Copy model, optimizer, ``extra`` and ``local`` tensors (see ``LOCAL_STEM``) to fresh
    CPU tensors."""
    files = {"model": _cpu_copy(model.state_dict())}
    file_meta: dict[str, dict[str, str]] = {}
    if optimizer is not None:
        tensors, optim_meta = flatten_optimizer_state(optimizer.state_dict())
        files["optimizer"] = _cpu_copy(tensors)
        file_meta["optimizer"] = {_OPTIM_META_KEY: json.dumps(optim_meta)}
    files["extra"] = _cpu_copy(extra or {})
    if local:
        files[LOCAL_STEM] = _cpu_copy(local)
    return Snapshot(step=step, files=files, file_meta=file_meta, meta=dict(meta or {}))


def _dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Published checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _DIR_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def write_snapshot(snapshot: Snapshot, root: str | Path, *, keep_last: int = 3) -> Path:
    """Write ``snapshot`` under ``root`` atomically and prune to the newest ``keep_last``.

    Returns the published folder. Leftover temporary folders from interrupted writes are
    removed first.
    """
    if keep_last < 1:
        raise CheckpointError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = _dir_name(snapshot.step)
    tmp = root / f".tmp-{name}"
    tmp.mkdir()
    manifest = Manifest(step=snapshot.step, meta=snapshot.meta)
    for stem, tensors in snapshot.files.items():
        data = safetensors.torch.save(tensors, metadata=snapshot.file_meta.get(stem))
        filename = f"{stem}.safetensors"
        _write_synced(tmp / filename, data)
        manifest.files[filename] = FileEntry(bytes=len(data), sha256=sha256_hex(data))
    _write_synced(tmp / MANIFEST_NAME, manifest.to_json().encode("utf-8"))
    _fsync_dir(tmp)
    final = root / name
    if final.exists():  # the same step written again after a resume: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep_last]:
        if old != final:  # older steps than a folder left by another run: keep ours
            shutil.rmtree(old, ignore_errors=True)
    return final


def _read_verified(folder: Path, name: str, entry: FileEntry) -> bytes:
    if "/" in name or "\\" in name or name.startswith("."):
        raise CheckpointError(f"checkpoint manifest in {folder} lists a bad file name {name!r}")
    path = folder / name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint file {path} is unreadable: {exc}") from exc
    if len(data) != entry.bytes:
        raise CheckpointError(
            f"checkpoint file {path} is truncated or torn: {len(data)} bytes, expected {entry.bytes}"
        )
    if sha256_hex(data) != entry.sha256:
        raise CheckpointError(f"checkpoint file {path} is corrupt: sha256 mismatch")
    return data


def _parse(path: Path, data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        tensors = safetensors.torch.load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint file {path} is not valid safetensors: {exc}") from exc
    return tensors, dict(header.get("__metadata__") or {})


def read_checkpoint(folder: str | Path) -> LoadedCheckpoint:
    """Read and verify the checkpoint in ``folder``.

    Raises:
        CheckpointError: missing/unreadable manifest, or a file that is missing, truncated,
            corrupt (sha256) or not valid safetensors; the message names the file.
    """
    folder = Path(folder)
    manifest = Manifest.read(folder / MANIFEST_NAME)
    if "model.safetensors" not in manifest.files:
        raise CheckpointError(f"checkpoint manifest {folder / MANIFEST_NAME} lists no model file")
    parsed: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}
    for name, entry in manifest.files.items():
        parsed[name] = _parse(folder / name, _read_verified(folder, name, entry))
    optimizer = None
    if "optimizer.safetensors" in parsed:
        tensors, file_meta = parsed["optimizer.safetensors"]
        try:
            optim_meta = json.loads(file_meta[_OPTIM_META_KEY])
        except (KeyError, ValueError) as exc:
            path = folder / "optimizer.safetensors"
            raise CheckpointError(f"checkpoint file {path} lacks optimizer metadata") from exc
        optimizer = unflatten_optimizer_state(tensors, optim_meta)
    return LoadedCheckpoint(
        path=folder,
        step=manifest.step,
        model=parsed["model.safetensors"][0],
        optimizer=optimizer,
        extra=parsed.get("extra.safetensors", ({}, {}))[0],
        local=parsed.get(f"{LOCAL_STEM}.safetensors", ({}, {}))[0],
        meta=manifest.meta,
    )


def load_latest_valid(root: str | Path) -> LoadedCheckpoint | None:
    """The newest checkpoint under ``root`` that verifies, or None if there is none.

    Invalid ones (torn, corrupt) are skipped with a warning naming the problem.
    """
    for folder in reversed(list_checkpoints(root)):
        try:
            return read_checkpoint(folder)
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s", folder.name, exc)
    return None
