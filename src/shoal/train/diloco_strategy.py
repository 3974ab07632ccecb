"""DiLoCo as a swarm strategy: the local trainer + :class:`DiLoCo` + rounds over the DHT."""

from __future__ import annotations

import contextlib
import logging
import threading
from functools import partial

import torch

from shoal.errors import CheckpointError, NetworkError
from shoal.state.checkpoint import meta_count
from shoal.train.diloco import DiLoCo, DiLoCoConfig, ResyncState
from shoal.train.diloco_lowrank import LowRankAverager
from shoal.train.diloco_topk import TopKAverager
from shoal.train.swarm_config import PeerOptions
from shoal.train.swarm_round_config import RoundOutcome
from shoal.train.swarm_services import PeerServices
from shoal.train.swarm_state import LOCAL_PREFIX, fetch_snapshot_from_swarm
from shoal.train.swarm_strategy import (
    StepOutcome,
    blocking_round,
    outer_round_key,
    record_round_time,
    swarm_average,
    swarm_rounds,
)
from shoal.train.trainer import Trainer

__all__ = ["DiLoCoStrategy", "resync_from_swarm"]

_DECLINE_S = 2.0
"""Longest telling a round's other members that this peer skips its second exchange takes."""


def _again_tag(stage: int) -> bytes:
    """The tag of a round's follow-up exchange ``stage`` (low-rank: 1, the R factors)."""
    return f"/{stage}".encode()


log = logging.getLogger(__name__)


class DiLoCoStrategy:
    mode = "diloco"

    def __init__(
        self,
        trainer: Trainer,
        services: PeerServices,
        opts: PeerOptions,
        stop: threading.Event,
        *,
        applied_step: int = 0,
    ) -> None:
        self.trainer = trainer
        self.services = services
        self.opts = opts
        self.stop = stop
        self.rounds = swarm_rounds(services, opts)
        self.applied_step = applied_step
        """Local step of the last applied outer step (resync only takes fresher state)."""
        params = list(trainer.model.parameters())
        self.lowrank = (
            LowRankAverager([p.shape for p in params], opts.rank, seed=opts.seed)
            if opts.rank > 0
            else None
        )
        self.topk = TopKAverager(opts.topk) if opts.topk > 0 else None
        self.diloco = DiLoCo(
            params,
            DiLoCoConfig(local_steps=opts.local_steps, outer=opts.outer),
            self._average,
            self._resync,
            self._on_resync,
            fits=self.lowrank.state_misfit if self.lowrank is not None else None,
        )

    @property
    def round_index(self) -> int:
        return self.diloco.round_index

    def _average(self, vector: torch.Tensor, weight: float, index: int) -> RoundOutcome:
        if self.lowrank is not None:
            outcome = self.lowrank.average(vector, weight, index, self._raw)
        elif self.topk is not None:
            outcome = self.topk.average(vector, weight, index, self._raw)
        else:
            outcome = self._raw(vector, weight, index, 0)
        record_round_time(self.services, outcome)
        return outcome

    def _raw(self, vector: torch.Tensor, weight: float, index: int, stage: int) -> RoundOutcome:
        if stage == 0:
            key = outer_round_key(self.mode, self.diloco.outer.fingerprint())
            coro = swarm_average(self.services, self.rounds, vector, weight, key)
        else:
            coro = self.rounds.again(vector, weight, tag=_again_tag(stage))
        outcome = blocking_round(
            self.services.runtime,
            coro,
            stop=self.stop,
            timeout_s=self.rounds.config.round_deadline_s,
        )
        if stage == 0 and not outcome.ok and self.lowrank is not None and not self.stop.is_set():
            # Its group may have succeeded where its stage across groups failed: the
            # others' second exchange must not wait for it (best effort: the runtime may
            # be closing).
            with contextlib.suppress(NetworkError, RuntimeError):
                decline = self.rounds.decline_again(_again_tag(1))
                self.services.runtime.run(decline, timeout_s=_DECLINE_S)
        return outcome

    def _on_resync(self, state: ResyncState) -> None:
        # Adopted state counts as applied (with this peer's own step: a donor's steps are
        # not ours); later resyncs ask for more outer steps than it holds.
        self.applied_step = self.trainer.step
        if self.lowrank is not None:  # checked with the masters (DiLoCo's ``fits``): it fits
            self.lowrank.load_state_tensors(state.tensors)

    def _resync(self) -> ResyncState | None:
        if self.stop.is_set():  # the round after it is abandoned: no DHT read, no download
            return None
        return resync_from_swarm(
            self.services,
            self.mode,
            ahead_of=[self.diloco.applied],
            tag_below=self.diloco.outer.tag(),
        )

    def step(self) -> StepOutcome:
        with self.services.monitor.profiler.compute:
            _, loss_t = self.trainer.train_step()
            loss = float(loss_t)
        samples = self.opts.batch_size
        report = self.diloco.after_local_step(samples)
        if report is not None and report.ok:
            self.applied_step = self.trainer.step
        return StepOutcome.of(loss, samples, report)

    def fingerprint(self) -> str:
        return self.diloco.outer.fingerprint()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        extra: dict[str, torch.Tensor] = {}
        if self.lowrank is not None:
            extra = {**self.lowrank.state_tensors(), **self.lowrank.local_state()}
        elif self.topk is not None:
            extra = self.topk.local_state()
        return {**self.diloco.state_tensors(), **extra}

    @property
    def progress(self) -> list[int] | None:
        return [self.diloco.applied]

    @property
    def progress_tag(self) -> str | None:
        return self.diloco.outer.tag()

    def state_misfit(self, tensors: dict[str, torch.Tensor]) -> str | None:
        """Why a snapshot's outer ``tensors`` cannot be this peer's (None: they can): the
        outer state, and with ``--rank`` the ``Q`` every member must share with it."""
        return self.diloco.state_misfit(tensors)

    def load_state(
        self, tensors: dict[str, torch.Tensor], round_index: int, applied_step: int
    ) -> bool:
        if self.state_misfit(tensors) is not None:
            return False  # nothing changed
        self.applied_step = applied_step  # steps trained alone since make nothing fresher
        own = False  # this peer's own state (error feedback) came back from its disk
        if self.lowrank is not None:
            self.lowrank.load_state_tensors(tensors)
            own = self.lowrank.load_local_state(tensors)
        elif self.topk is not None:
            own = self.topk.load_local_state(tensors, self.diloco.outer.numel)
        if not own and any(k.startswith(LOCAL_PREFIX) for k in tensors):
            log.warning("own state in the checkpoint does not fit these settings: not restored")
        loaded = self.diloco.load_state(tensors, round_index)
        if loaded and applied_step < self.trainer.step:
            self.diloco.mark_stale()  # the swarm may have applied rounds without it
            carried = self.trainer.step - applied_step  # in the model, in no applied round
            self.diloco.carry(carried, carried * self.opts.batch_size)
        return loaded

    def start_from_outer(self) -> None:
        self.diloco.start_from_outer()

    def close(self) -> None:
        return None


def resync_from_swarm(
    services: PeerServices,
    mode: str,
    *,
    newer_than: int = -1,
    ahead_of: list[int] | None = None,
    tag_below: str | None = None,
) -> ResyncState | None:
    """The swarm's outer state (round index, ``outer.*`` tensors) if a donor of the same
    ``mode`` holds a snapshot newer than step ``newer_than`` (with ``ahead_of``, one whose
    progress counts are ahead of those somewhere, whatever its step, or with ``tag_below``
    the same counts under a smaller tag); else None. Donors are those announcing under
    ``services.state_key``: peers of this peer's round scope (``state_scope``)."""
    s = services
    # Only the outer state travels (the model and AdamW moments make up most of a
    # snapshot, several rounds' worth of bytes): the local model is rebased onto it.
    snapshot = fetch_snapshot_from_swarm(
        s.runtime,
        s.dht,
        s.state_key,
        newer_than=newer_than,
        only=lambda name: name.startswith("extra/outer."),
        ahead_of=ahead_of,
        tag_below=tag_below,
        refused=s.refused,
    )
    if snapshot is None:
        return None
    try:  # the donor's meta is whatever it sent: a bad one costs this resync, not the peer
        if snapshot.meta.get("mode") != mode:
            raise CheckpointError(f"mode {snapshot.meta.get('mode')!r}, not {mode!r}")
        round_index = meta_count(snapshot.meta, "round_index", 0)
    except CheckpointError as exc:
        log.warning("refused the swarm's snapshot of step %d: %s", snapshot.step, exc)
        s.refused.add(snapshot.version)
        return None
    tensors = {k: v for k, v in snapshot.files.get("extra", {}).items() if k.startswith("outer.")}
    refuse = partial(s.refused.add, snapshot.version)
    return ResyncState(round_index, tensors, snapshot.step, refuse)
