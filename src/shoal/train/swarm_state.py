"""What a swarm peer's snapshot holds, and how one is restored (from disk or from a donor).

A snapshot (``shoal.state`` format) holds the model, the inner AdamW state, the strategy's
own tensors in ``extra`` (DiLoCo: outer master parameters and momentum, named
``outer.*``; its own state, such as error feedback, ``local.*`` goes to the ``local``
file, which is never served), the data generator and RNG, and in the manifest meta: the
model shape, the data shard, the mode and the strategy's round index. A donor's snapshot
belongs to another peer's data shard: restoring it keeps this peer's own data stream (only
a snapshot of the same shard also restores the data position).

A peer's own state changes at every round it applies, while the disk may hold a checkpoint
from rounds back (``--checkpoint-every N``, or a write still queued when the peer died).
So the applied rounds are counted in a small file of the run dir (:class:`AppliedRounds`),
each before its snapshot is taken, snapshots record the count, and own state from a
checkpoint is taken back only when no round was applied after it
(:func:`local_is_current`): state from rounds back would send again what those rounds
already sent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from shoal.errors import CheckpointError, DataError, NetworkError
from shoal.models.data import TrainWindows
from shoal.state.announce import RefusedVersions
from shoal.state.checkpoint import (
    LoadedCheckpoint,
    Snapshot,
    is_generator_state,
    meta_count,
    meta_section,
    take_snapshot,
)
from shoal.state.sync_client import SyncConfig, download, find_donors

__all__ = [
    "APPLIED_FILE",
    "LOCAL_PREFIX",
    "AppliedRounds",
    "Restored",
    "applied_count",
    "drop_stale_local",
    "fetch_snapshot_from_swarm",
    "keep_own_local",
    "last_applied_count",
    "local_is_current",
    "restore_peer",
    "snapshot_peer",
]

log = logging.getLogger(__name__)

LOCAL_PREFIX = "local."
"""Strategy tensors under this prefix are the peer's own (e.g. error feedback): they go to
the snapshot's ``local`` file, written to disk and never served (``state.checkpoint``)."""


@dataclass(frozen=True, slots=True)
class Restored:
    step: int
    round_index: int
    strategy: dict[str, torch.Tensor]
    """The strategy's tensors: ``outer.*`` (swarm state, from ``extra``) and ``local.*``
    (this peer's own state, see ``LOCAL_PREFIX``: from its own disk only, also when the
    rest comes from a donor, see :func:`keep_own_local`)."""
    averaged: bool = True
    """The state is what the swarm agreed on (taken after an applied round), not local
    progress since: only such state may be served to other peers."""
    applied_step: int = 0
    """Step of the last round applied (``step`` for averaged state): a peer restarted from
    local progress takes swarm state fresher than this, not than ``step``; steps trained
    alone do not make its outer state any fresher."""
    applied_rounds: int | None = None
    """Rounds the writer had applied when the snapshot was taken (:class:`AppliedRounds`;
    None in snapshots from before that count)."""


APPLIED_FILE = "applied-rounds.json"
"""In the run dir: how many rounds the peer of this run dir has applied, over all its runs."""
_MAX_APPLIED_FILE_BYTES = 256


def last_applied_count(run_dir: Path) -> int | None:
    """The count :class:`AppliedRounds` last noted in ``run_dir``, or None: no note (no round
    applied yet, or a run dir older than the note) or one that cannot be read."""
    path = run_dir / APPLIED_FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_APPLIED_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
    try:
        value = json.loads(raw)["applied"] if len(raw) <= _MAX_APPLIED_FILE_BYTES else None
    except (ValueError, TypeError, KeyError):
        value = None
    if type(value) is not int or value < 0:
        log.warning("%s does not hold a count of applied rounds: ignored", path)
        return None
    return value


class AppliedRounds:
    """The rounds this run dir's peer applied, counted across restarts and noted on disk.

    :meth:`applied` is called for each applied round before its snapshot is taken, and
    snapshots record :attr:`count` (``applied_rounds`` in their meta). A checkpoint whose
    count is below the note's predates rounds this peer's own state (error feedback) went
    into; a peer killed between the note and the write finds its checkpoint behind the
    note, never ahead of a round it missed. The count starts at the larger of the note and
    this peer's newest checkpoint, so it only grows.
    """

    def __init__(self, run_dir: Path, own_meta: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.noted = last_applied_count(run_dir)
        """The note as this run found it (what own state on disk is checked against)."""
        self.count = max(self.noted or 0, applied_count(own_meta) or 0)

    def applied(self) -> None:
        """Count one more applied round and note it (atomically, synced). A note that
        cannot be written is removed, so that no older one vouches for stale state."""
        self.count += 1
        path = self.run_dir / APPLIED_FILE
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump({"applied": self.count}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            log.warning(
                "cannot note the applied round in %s (%s): own state (error feedback) will "
                "not be taken back after a restart",
                path,
                exc,
            )
            with contextlib.suppress(OSError):
                path.unlink()
            return
        # The rename is durable once the folder is synced; a filesystem that cannot sync
        # folders keeps it as the file system keeps renames (the note itself is written).
        with contextlib.suppress(OSError):
            folder = os.open(self.run_dir, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)


def applied_count(meta: dict[str, Any]) -> int | None:
    """The ``applied_rounds`` a snapshot's meta records, or None (none, or not a count)."""
    count = meta.get("applied_rounds")
    return count if type(count) is int and count >= 0 else None


def local_is_current(checkpoint_count: int | None, noted_count: int | None) -> bool:
    """Whether own state from a checkpoint taken after ``checkpoint_count`` applied rounds
    (:func:`applied_count`) is still this peer's: no round was applied after it
    (``noted_count`` from :func:`last_applied_count`; None, unknown, is not current)."""
    return (
        noted_count is not None and checkpoint_count is not None and checkpoint_count >= noted_count
    )


def _refuse_stale(checkpoint_count: int | None, noted_count: int | None) -> None:
    if noted_count is None:
        log.info("no note of the rounds this peer applied: own state on disk is not taken back")
        return
    log.warning(
        "own state on disk (error feedback) was taken after %s applied rounds, %d were "
        "applied: not taken back (it would send again what later rounds sent)",
        "unknown" if checkpoint_count is None else checkpoint_count,
        noted_count,
    )


def drop_stale_local(restored: Restored, noted_count: int | None) -> Restored:
    """``restored`` (from this peer's own disk) without its ``local.*`` tensors unless
    :func:`local_is_current`."""
    if local_is_current(restored.applied_rounds, noted_count):
        return restored
    kept = {k: v for k, v in restored.strategy.items() if not k.startswith(LOCAL_PREFIX)}
    if len(kept) < len(restored.strategy):
        _refuse_stale(restored.applied_rounds, noted_count)
    return replace(restored, strategy=kept)


def snapshot_peer(
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    windows: TrainWindows,
    *,
    strategy: dict[str, torch.Tensor],
    round_index: int,
    mode: str,
    model_shape: dict[str, Any],
    data_seed: int,
    averaged: bool = True,
    applied_step: int | None = None,
    progress: list[int] | None = None,
    progress_tag: str | None = None,
    applied_rounds: int | None = None,
) -> Snapshot:
    """CPU snapshot of a swarm peer (compute thread); ``averaged=False`` marks local
    progress the swarm has not averaged (see :attr:`Restored.averaged`)."""
    data = windows.state_dict()
    extra = {"rng.torch_cpu": torch.get_rng_state(), "data.generator": data["generator"]}
    local: dict[str, torch.Tensor] = {}
    for name, tensor in strategy.items():
        (local if name.startswith(LOCAL_PREFIX) else extra)[name] = tensor
    meta = {
        "config": {"model_shape": model_shape},
        "mode": mode,
        "round_index": round_index,
        "averaged": averaged,
        "applied_step": step if applied_step is None else applied_step,
        "data": {
            "batches_drawn": data["batches_drawn"],
            "shard_index": windows.shard_index,
            "num_shards": windows.num_shards,
            "seed": data_seed,
        },
    }
    if progress is not None:
        meta["progress"] = list(progress)
        if progress_tag is not None:
            meta["progress_tag"] = progress_tag
    if applied_rounds is not None:
        meta["applied_rounds"] = applied_rounds
    return take_snapshot(step, model, optimizer, extra=extra, local=local, meta=meta)


def restore_peer(
    ckpt: LoadedCheckpoint,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    windows: TrainWindows,
    *,
    mode: str,
    model_shape: dict[str, Any],
    data_seed: int,
    check: Callable[[dict[str, torch.Tensor]], str | None] | None = None,
) -> Restored:
    """Load ``ckpt`` into the peer's objects. Everything is checked before anything is
    loaded: the meta (a donor's snapshot is whatever the donor sent), the data state, and
    ``check(strategy tensors)``, which says why the strategy cannot take them (None: it can).

    Raises:
        CheckpointError: another model shape or mode, meta that is not what a peer writes,
            or tensors that do not fit.
    """
    mismatch = _written_for_another(ckpt.meta, mode, model_shape)
    if mismatch is not None:
        raise CheckpointError(f"{ckpt.path}: {mismatch}")
    try:
        round_index = meta_count(ckpt.meta, "round_index", 0)
        data_state = _data_state(ckpt, windows, data_seed)
    except CheckpointError as exc:
        raise CheckpointError(f"{ckpt.path}: {exc}") from None
    strategy = {k: v for k, v in ckpt.extra.items() if k.startswith("outer.")}
    strategy.update({k: v for k, v in ckpt.local.items() if k.startswith(LOCAL_PREFIX)})
    why = check(strategy) if check is not None else None
    if why is not None:
        raise CheckpointError(f"{ckpt.path}: its outer state does not fit this peer: {why}")
    try:
        model.load_state_dict(ckpt.model, strict=True)
        if ckpt.optimizer is not None:
            optimizer.load_state_dict(ckpt.optimizer)
        if data_state is not None:
            windows.load_state_dict(data_state)
    except (RuntimeError, ValueError, KeyError, DataError) as exc:
        raise CheckpointError(f"{ckpt.path} does not fit the model: {exc}") from exc
    averaged = ckpt.meta.get("averaged", True) is not False
    applied = ckpt.meta.get("applied_step", ckpt.step)
    if type(applied) is not int or not 0 <= applied <= ckpt.step:
        applied = ckpt.step
    return Restored(ckpt.step, round_index, strategy, averaged, applied, applied_count(ckpt.meta))


def _data_state(
    ckpt: LoadedCheckpoint, windows: TrainWindows, data_seed: int
) -> dict[str, Any] | None:
    """The data position to restore: only from a snapshot of this peer's own stream
    (None: another stream, or none saved).

    Raises:
        CheckpointError: its meta or generator state is not what a peer writes.
    """
    data = meta_section(ckpt.meta, "data")
    same_stream = (data.get("shard_index"), data.get("num_shards"), data.get("seed")) == (
        windows.shard_index,
        windows.num_shards,
        data_seed,
    )
    generator = ckpt.extra.get("data.generator")
    if not same_stream or generator is None:
        return None
    if not is_generator_state(generator):
        raise CheckpointError(f"data.generator is {generator.dtype} {tuple(generator.shape)}")
    return {"generator": generator, "batches_drawn": meta_count(data, "batches_drawn", 0)}


def _written_for_another(
    meta: dict[str, Any], mode: str, model_shape: dict[str, Any]
) -> str | None:
    """Why a checkpoint with this ``meta`` is not for a peer of ``mode`` and ``model_shape``
    (None: it is)."""
    config = meta.get("config")
    saved_shape = config.get("model_shape") if isinstance(config, dict) else None
    if saved_shape != model_shape:
        return f"model {saved_shape}, not {model_shape}"
    if meta.get("mode") != mode:
        return f"mode {meta.get('mode')!r}, not {mode!r}"
    return None


def keep_own_local(
    restored: Restored,
    own_local: dict[str, torch.Tensor],
    own_meta: dict[str, Any],
    *,
    mode: str,
    model_shape: dict[str, Any],
    noted_count: int | None,
) -> Restored:
    """``restored`` (a donor's state) with this peer's own ``local.*`` tensors from its disk:
    error feedback is progress the swarm has not seen, whichever state a restart takes, and
    it carries over rounds that moved the swarm anyway.

    Only from a checkpoint of the same mode and model, taken after the last round this peer
    applied (``noted_count``, see :func:`local_is_current`): error feedback changes at
    every round this peer's values go into, and one from rounds back would send again what
    those rounds sent. The strategy checks that the tensors fit.
    """
    own = {k: v for k, v in own_local.items() if k.startswith(LOCAL_PREFIX)}
    if not own:
        return restored
    mismatch = _written_for_another(own_meta, mode, model_shape)
    if mismatch is not None:
        log.warning("own state on disk is not taken back: %s", mismatch)
        return restored
    checkpoint_count = applied_count(own_meta)
    if not local_is_current(checkpoint_count, noted_count):
        _refuse_stale(checkpoint_count, noted_count)
        return restored
    return replace(restored, strategy={**restored.strategy, **own})


def fetch_snapshot_from_swarm(
    runtime: Any,
    dht: Any,
    key: bytes,
    *,
    newer_than: int,
    timeout_s: float = 30.0,
    only: Callable[[str], bool] | None = None,
    ahead_of: list[int] | None = None,
    tag_below: str | None = None,
    refused: RefusedVersions | None = None,
) -> Snapshot | None:
    """Download the freshest announced snapshot if its step is above ``newer_than``,
    optionally only its ``only`` tensors (selected by manifest name, ``"<file
    stem>/<key>"``). Blocking (compute thread); network failures give None (logged), never
    an exception. With ``ahead_of`` (progress
    counts), a snapshot counts as fresher when its counts are ahead of those somewhere,
    whatever its step: steps drift apart between peers; with ``tag_below`` too, so does
    one of the same counts under a smaller progress tag (``choose_donors``).

    Snapshots of a version in ``refused`` are passed over: a caller that cannot use what
    it got adds ``snapshot.version`` there, and its next ask finds another donor's."""
    config = SyncConfig(dht_timeout_s=min(10.0, timeout_s), total_timeout_s=timeout_s)
    skip = refused if refused is not None else ()
    try:
        choice = runtime.run(
            find_donors(
                dht,
                key,
                config,
                exclude=runtime.peer_id,
                ahead_of=ahead_of,
                tag_below=tag_below,
                skip=skip,
            ),
            timeout_s=timeout_s,
        )
        if ahead_of is not None:
            if choice is None:
                log.info("no state in the swarm ahead of this peer's rounds %s", ahead_of)
                return None
        elif choice is None or choice.step <= newer_than:
            log.info(
                "no fresher state in the swarm (freshest %s, have %d)",
                None if choice is None else choice.step,
                newer_than,
            )
            return None
        else:
            choice = choice.newer_than(newer_than)
        result = runtime.run(
            download(runtime, choice, config, only=only),
            timeout_s=timeout_s + 5.0,
        )
    except (NetworkError, TimeoutError) as exc:
        log.warning("state sync from the swarm failed: %s", exc)
        return None
    fetched = sum(
        int(t.numel() * t.element_size())
        for f in result.snapshot.files.values()
        for t in f.values()
    )
    log.info("fetched the swarm's state of step %d (%d bytes)", result.snapshot.step, fetched)
    return result.snapshot
