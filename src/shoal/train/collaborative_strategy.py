"""Collaborative sync as a swarm strategy: progress records in the DHT, averaged gradients.

Progress lives under ``shoal/v1/swarm/<swarm>/progress`` with one owned subkey per peer
(the DHT signs it; nobody can write another peer's progress). The value is msgpack
``[step, samples]``, bounded and type-checked on read; records expire after a few check
intervals so a vanished peer stops counting toward the global batch.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any

import msgpack
import torch

from shoal.errors import CheckpointError, NetworkError
from shoal.state.snapshot import as_checkpoint
from shoal.train.collaborative import CollaborativeConfig, CollaborativeSync, ProgressRecord
from shoal.train.swarm_config import PeerOptions
from shoal.train.swarm_round_config import RoundOutcome, RoundsConfig
from shoal.train.swarm_services import PeerServices
from shoal.train.swarm_state import fetch_snapshot_from_swarm, restore_peer
from shoal.train.swarm_strategy import (
    StepOutcome,
    blocking_round,
    record_round_time,
    round_key,
    swarm_average,
    swarm_rounds,
)
from shoal.train.trainer import Trainer

__all__ = ["SyncStrategy", "parse_progress"]

log = logging.getLogger(__name__)

_PEER_ID_BYTES = 32
_MAX_VALUE_BYTES = 64
_MAX_STEP = 1 << 48


def parse_progress(found: Any) -> list[tuple[bytes, int, int]]:
    """``(peer, step, samples)`` for every well-formed record (others skipped)."""
    if not isinstance(found, dict):
        return []
    out = []
    for subkey, value in found.items():
        if len(subkey) != _PEER_ID_BYTES or len(value) > _MAX_VALUE_BYTES:
            continue
        try:
            fields = msgpack.unpackb(value)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            continue
        if not isinstance(fields, list) or len(fields) != 2:
            continue
        step, samples = fields
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in fields):
            continue
        if 0 <= step < _MAX_STEP and 0 <= samples < _MAX_STEP:
            out.append((subkey, step, samples))
    return out


def progress_ttl_s(rounds: RoundsConfig) -> float:
    """How long a peer's progress record counts for the others.

    A peer publishes between micro-batches only, not while it waits in a round (up to the
    round deadline) nor during a long step: a record that lapsed sooner made the others
    stop counting a peer that was waiting for them, so every round shrank to one peer's
    own target batch. A record of a peer that moved on (or died) is for an old step and
    is ignored, or counts at most until this lapses.
    """
    return max(10.0, rounds.round_deadline_s)


class SyncStrategy:
    mode = "sync"

    def __init__(
        self, trainer: Trainer, services: PeerServices, opts: PeerOptions, stop: threading.Event
    ) -> None:
        self.trainer = trainer
        self.services = services
        self.opts = opts
        self.stop = stop
        self.rounds = swarm_rounds(services, opts)
        self.key = f"shoal/v1/swarm/{opts.swarm}/progress".encode()
        self.ttl_s = progress_ttl_s(self.rounds.config)
        me = services.runtime.peer_id.raw
        self.sync = CollaborativeSync(
            trainer.model,
            trainer.optimizer,
            CollaborativeConfig(target_batch=opts.target_batch, grad_clip=1.0),
            me=me,
            lr_at=trainer.lr_at,
            publish=self._publish,
            fetch=self._fetch,
            average=self._average,
            catch_up=self._catch_up,
        )
        self.sync.step = trainer.step

    @property
    def round_index(self) -> int:
        return self.sync.step

    def _publish(self, step: int, samples: int) -> None:
        value = msgpack.packb([step, samples])
        try:
            self.services.dht.store(self.key, value, time.time() + self.ttl_s, subkey=b"")
        except (NetworkError, TimeoutError) as exc:
            log.debug("progress publish failed: %s", exc)

    def _fetch(self) -> list[ProgressRecord]:
        try:
            found = self.services.dht.get(self.key, timeout_s=5.0)
        except (NetworkError, TimeoutError):
            return []
        return [ProgressRecord(*fields) for fields in parse_progress(found)]

    def _average(self, vector: torch.Tensor, weight: float, index: int) -> RoundOutcome:
        fp = _fingerprint(self.trainer.model)
        outcome = blocking_round(
            self.services.runtime,
            swarm_average(
                self.services, self.rounds, vector, weight, round_key(self.mode, index, fp)
            ),
            stop=self.stop,
            timeout_s=self.rounds.config.round_deadline_s,
        )
        record_round_time(self.services, outcome)
        return outcome

    def _catch_up(self) -> bool:
        if self.stop.is_set():  # the round failed because we are stopping: no download
            return False
        s, t = self.services, self.trainer
        snapshot = fetch_snapshot_from_swarm(
            s.runtime, s.dht, s.state_key, newer_than=t.step, refused=s.refused
        )
        if snapshot is None:
            return False
        try:
            restored = restore_peer(
                as_checkpoint(snapshot, "swarm"),
                t.model,
                t.optimizer,
                t.windows,
                mode=self.mode,
                model_shape=t.model_cfg.to_dict(),
                data_seed=-1,
            )
        except CheckpointError as exc:
            log.warning("catch-up state does not fit: %s", exc)
            s.refused.add(snapshot.version)
            return False
        t.step = self.sync.step = restored.step
        return True

    def step(self) -> StepOutcome:
        t = self.trainer
        with self.services.monitor.profiler.compute:
            x, y = t.windows.next_batch()
            with t.autocast():
                loss = t.model(x.to(t.device), y.to(t.device))
            loss.backward()
        report = self.sync.after_backward(self.opts.batch_size)
        t.step = self.sync.step
        return StepOutcome.of(float(loss.detach()), self.opts.batch_size, report)

    def fingerprint(self) -> str:
        return _fingerprint(self.trainer.model)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    @property
    def applied_step(self) -> int:
        return self.trainer.step  # a sync step is a round: nothing runs ahead of the swarm

    @property
    def progress(self) -> list[int] | None:
        return None

    @property
    def progress_tag(self) -> str | None:
        return None

    def state_misfit(self, tensors: dict[str, torch.Tensor]) -> str | None:
        return None  # the model and AdamW are the state, and restore_peer loads them

    def load_state(
        self, tensors: dict[str, torch.Tensor], round_index: int, applied_step: int
    ) -> bool:
        self.sync.step = self.trainer.step
        return True

    def start_from_outer(self) -> None:
        pass  # no outer state: the donor's model is the swarm's, averaged every step

    def close(self) -> None:
        return None


def _fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=8)
    for p in model.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()
