"""Streaming DiLoCo as a swarm strategy: fragment rounds run on the network loop."""

from __future__ import annotations

import concurrent.futures
import threading

import torch

from shoal.train.diloco import ResyncState
from shoal.train.diloco_strategy import resync_from_swarm
from shoal.train.diloco_streaming import StreamingDiLoCo
from shoal.train.swarm_config import PeerOptions
from shoal.train.swarm_round_config import RoundOutcome
from shoal.train.swarm_services import PeerServices
from shoal.train.swarm_strategy import StepOutcome, outer_round_key, swarm_average, swarm_rounds
from shoal.train.trainer import Trainer

__all__ = ["StreamingStrategy"]


class StreamingStrategy:
    mode = "streaming"

    def __init__(
        self, trainer: Trainer, services: PeerServices, opts: PeerOptions, stop: threading.Event
    ) -> None:
        self.trainer = trainer
        self.services = services
        self.opts = opts
        self.stop = stop
        self.rounds = swarm_rounds(services, opts)
        self.applied_step = trainer.step
        self.streaming = StreamingDiLoCo(
            list(trainer.model.parameters()),
            local_steps=opts.local_steps,
            fragments=opts.fragments,
            overlap_steps=opts.overlap,
            mix_alpha=opts.mix_alpha,
            outer=opts.outer,
            launch=self._launch,
            resync=self._resync,
            wait_timeout_s=self.rounds.config.round_deadline_s,
            stop=stop,
            on_resync=self._on_resync,
        )
        self.streaming.step = trainer.step

    @property
    def round_index(self) -> int:
        return self.streaming.round_index

    def _launch(
        self, vector: torch.Tensor, weight: float, index: int, fragment: int, fp: str
    ) -> concurrent.futures.Future[RoundOutcome]:
        key = outer_round_key(self.mode, f"{fragment}/{fp}")
        return self.services.runtime.submit(
            swarm_average(self.services, self.rounds, vector, weight, key)
        )

    @property
    def progress(self) -> list[int] | None:
        return list(self.streaming.applied)

    @property
    def progress_tag(self) -> str | None:
        return self.streaming.tag()

    def _resync(self, ahead_of: list[int], tag_below: str) -> ResyncState | None:
        return resync_from_swarm(self.services, self.mode, ahead_of=ahead_of, tag_below=tag_below)

    def _on_resync(self) -> None:
        # Adopted: what trained since is rebased onto the swarm's. Not on a state that was
        # refused, or that held no fragment ahead of ours: that changed nothing.
        self.applied_step = self.trainer.step  # own steps: a donor's are not ours

    def step(self) -> StepOutcome:
        with self.services.monitor.profiler.compute:
            _, loss_t = self.trainer.train_step()
            loss = float(loss_t)
        samples = self.opts.batch_size
        with self.services.monitor.profiler.waiting:
            reports = self.streaming.after_local_step(samples)
        if self.stop.is_set():  # the round in flight is abandoned, the ones that landed kept
            reports += self.streaming.drain()
        if any(r.ok for r in reports):
            self.applied_step = self.trainer.step
        return StepOutcome(loss, samples, tuple(reports))

    def fingerprint(self) -> str:
        return "-".join(o.fingerprint() for o in self.streaming.outers)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.streaming.state_tensors()

    def state_misfit(self, tensors: dict[str, torch.Tensor]) -> str | None:
        return self.streaming.state_misfit(tensors)

    def load_state(
        self, tensors: dict[str, torch.Tensor], round_index: int, applied_step: int
    ) -> bool:
        if not self.streaming.load_state(tensors):
            return False  # nothing changed
        self.streaming.step = self.trainer.step
        self.streaming.round_index = round_index
        self.applied_step = applied_step
        # Trained alone since its last applied round (a restart from its own progress):
        # the swarm may have applied rounds without it, so it asks before its first launch.
        if applied_step < self.trainer.step:
            self.streaming.mark_stale()
            carried = self.trainer.step - applied_step  # in the model, in no applied round
            self.streaming.carry(carried, carried * self.opts.batch_size)
        return True

    def start_from_outer(self) -> None:
        self.streaming.start_from_outer()

    def close(self) -> None:
        p = self.streaming.pending
        if p is not None:
            p.future.cancel()
