"""Recovery at peer startup: continue from the local disk or from the swarm, whichever is fresher.

    found = recover(run_dir / "checkpoints", runtime, dht, state_key("main"))
    if found.checkpoint is not None:
        step = restore_run(found.checkpoint, model, optimizer, windows, config)

``recover`` reads the newest valid local checkpoint (torn or corrupt ones are skipped with a
log line naming the file) and the freshest step donors announce in the DHT;
``choose_source`` (pure) picks the swarm only when it is strictly ahead. A failed swarm
download falls back to the disk copy. A whole swarm restarted from nothing announces
nothing, so every peer continues from its own disk: the swarm resumes at its last step.
The newest disk checkpoint's ``local`` file (the peer's own state) comes back whatever
the source: no donor serves it.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.errors import NetworkError
from shoal.state.announce import DonorChoice
from shoal.state.checkpoint import LoadedCheckpoint, load_latest_valid
from shoal.state.snapshot import as_checkpoint
from shoal.state.sync_client import SyncConfig, download, find_donors

__all__ = ["Recovered", "Source", "choose_source", "recover"]

log = logging.getLogger(__name__)


class Source(str, enum.Enum):
    DISK = "disk"
    SWARM = "swarm"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Recovered:
    """Where the state to continue from came from."""

    source: Source
    checkpoint: LoadedCheckpoint | None
    """The state to restore (None: start fresh)."""
    local_step: int | None
    """Step of the newest valid checkpoint on disk, if any."""
    swarm_step: int | None
    """Freshest step announced by other peers, if any."""
    own_local: dict[str, Any] = field(default_factory=dict)
    """The ``local`` file of the newest valid checkpoint on disk (this peer's own state,
    such as error feedback), whichever source the rest comes from: no donor has it."""
    own_meta: dict[str, Any] = field(default_factory=dict)
    """That checkpoint's meta (what it was written by: mode, model, ...)."""
    swarm_version: str = ""
    """The version of the snapshot downloaded from the swarm (empty: none was)."""

    @property
    def step(self) -> int:
        return self.checkpoint.step if self.checkpoint is not None else 0


def choose_source(local_step: int | None, swarm_step: int | None) -> Source:
    """The swarm when it is strictly ahead of the disk, else the disk, else nothing."""
    if swarm_step is not None and (local_step is None or swarm_step > local_step):
        return Source.SWARM
    return Source.DISK if local_step is not None else Source.NONE


def recover(
    checkpoint_dir: str | Path,
    runtime: Any,
    dht: Any,
    key: bytes,
    config: SyncConfig | None = None,
) -> Recovered:
    """Find the freshest state for this peer (blocking; call from the compute thread).

    Network failures never raise: they are logged and the disk copy is used.
    """
    config = config or SyncConfig()
    local = load_latest_valid(checkpoint_dir)
    local_step = local.step if local is not None else None
    own_local, own_meta = (dict(local.local), dict(local.meta)) if local is not None else ({}, {})
    choice: DonorChoice | None = None
    if dht is not None:
        try:
            choice = runtime.run(
                find_donors(dht, key, config, exclude=runtime.peer_id),
                timeout_s=config.dht_timeout_s + 1.0,
            )
        except NetworkError as exc:
            log.warning("could not read state announcements: %s", exc)
    swarm_step = choice.step if choice is not None else None
    source = choose_source(local_step, swarm_step)
    log.info(
        "recovery: local checkpoint step %s, swarm step %s -> %s",
        local_step,
        swarm_step,
        source.value,
    )
    if source is Source.SWARM and choice is not None:
        try:
            result = runtime.run(
                download(runtime, choice.newer_than(local_step), config),
                timeout_s=config.total_timeout_s + 5.0,
            )
        except NetworkError as exc:
            log.warning("state sync from the swarm failed (%s); falling back to disk", exc)
        else:
            donors = ",".join(sorted(result.bytes_by_donor))
            ckpt = as_checkpoint(result.snapshot, f"swarm:{donors}")
            log.info(
                "recovered step %d from the swarm (%d bytes in %.2f s from %s)",
                ckpt.step,
                result.manifest.total_bytes,
                result.seconds,
                donors,
            )
            return Recovered(
                Source.SWARM,
                ckpt,
                local_step,
                swarm_step,
                own_local,
                own_meta,
                swarm_version=result.snapshot.version,
            )
        source = choose_source(local_step, None)
    disk = local if source is Source.DISK else None
    return Recovered(source, disk, local_step, swarm_step, own_local, own_meta)
