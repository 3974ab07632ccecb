"""Collaborative synchronous training: the swarm steps together once it has a global batch.

Each peer trains micro-batches and accumulates gradients. It publishes how many samples it
accumulated toward the current step (``ProgressRecord``) and reads everyone's. When the
sum over the records of this step reaches ``target_batch``, every peer averages its mean
gradient weighted by the samples it actually contributed, and all contributors apply the
same AdamW step (``round_key`` carries the step and a fingerprint of the parameters, so
only peers with equal parameters average together). A peer whose round fails discards its
accumulated gradients and catches up by loading the swarm's state (``catch_up``).

``global_samples`` and ``should_step`` are pure; :class:`CollaborativeSync` takes its
I/O as callables (``publish``, ``fetch``, ``average``, ``catch_up``) and a clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from shoal.errors import ConfigError
from shoal.train.diloco import RoundReport
from shoal.train.swarm_round_config import RoundOutcome

__all__ = [
    "CollaborativeConfig",
    "CollaborativeSync",
    "ProgressRecord",
    "global_samples",
    "should_step",
]


@dataclass(frozen=True, slots=True)
class ProgressRecord:
    """One peer's accumulation toward a step, as published in the DHT (which returns
    unexpired records only: a record lapses ``progress_ttl_s`` after its last publish)."""

    peer: bytes
    step: int
    samples: int


@dataclass(frozen=True, kw_only=True, slots=True)
class CollaborativeConfig:
    target_batch: int = 256
    """Global samples per optimizer step."""
    check_interval_s: float = 0.5
    """How often progress is published and read."""
    alone_retry_s: float = 5.0
    """After a round skipped for want of peers, how long to keep accumulating before the
    next try (the gradients and samples are kept: the next round carries them)."""
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.target_batch < 1:
            raise ConfigError(f"target_batch must be >= 1, got {self.target_batch!r}")
        if not self.check_interval_s > 0:
            raise ConfigError(f"check_interval_s must be > 0, got {self.check_interval_s!r}")


def global_samples(
    records: Iterable[ProgressRecord], *, step: int, me: bytes, my_samples: int
) -> int:
    """Samples the swarm accumulated toward ``step``: ours (exact) + others' records."""
    others: dict[bytes, int] = {}
    for r in records:
        if r.peer != me and r.step == step:
            others[r.peer] = max(others.get(r.peer, 0), r.samples)
    return my_samples + sum(others.values())


def should_step(total: int, target_batch: int, my_samples: int) -> bool:
    """Step once the global batch is reached, and only with something of our own to add."""
    return my_samples > 0 and total >= target_batch


class CollaborativeSync:
    """Gradient accumulation toward a global batch, then one averaged AdamW step."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: CollaborativeConfig,
        *,
        me: bytes,
        lr_at: Callable[[int], float],
        publish: Callable[[int, int], None],
        fetch: Callable[[], list[ProgressRecord]],
        average: Callable[[torch.Tensor, float, int], RoundOutcome],
        catch_up: Callable[[], bool],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.me = me
        self.lr_at = lr_at
        self.publish = publish
        self.fetch = fetch
        self.average = average
        self.catch_up = catch_up
        self.clock = clock
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step = 0
        self.samples = 0
        self.micro_batches = 0
        self._others = 0
        self._next_check = 0.0
        self._retry_at = 0.0
        self.attempts = 0
        """Rounds attempted (the strategy's round index)."""

    def after_backward(self, samples: int) -> RoundReport | None:
        """Count one micro-batch (gradients already accumulated); step when the batch is full."""
        self.samples += samples
        self.micro_batches += 1
        now = self.clock()
        if now >= self._next_check:
            self._next_check = now + self.config.check_interval_s
            self.publish(self.step, self.samples)
            total = global_samples(
                self.fetch(), step=self.step, me=self.me, my_samples=self.samples
            )
            self._others = total - self.samples
        total = self._others + self.samples
        if not should_step(total, self.config.target_batch, self.samples) or now < self._retry_at:
            return None
        return self._round()

    def _round(self) -> RoundReport:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.detach().reshape(-1).float() for g in grads]) / self.micro_batches
        index = self.step
        outcome = self.average(flat, float(self.samples), index)
        if outcome.skipped:  # alone: keep accumulating, and say so only now and then
            self._retry_at = self.clock() + self.config.alone_retry_s
            return RoundReport(index, False, 0, 0, 0.0, outcome.reason, dict(outcome.seconds))
        self.attempts += 1
        resynced = False
        if outcome.ok:
            offset = 0
            for p in self.params:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
                offset += n
            if self.config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(self.step)
            self.optimizer.step()
            self.step += 1
        else:
            resynced = self.catch_up()
        self.optimizer.zero_grad(set_to_none=True)
        self.samples = 0
        self.micro_batches = 0
        self._others = 0
        self._next_check = 0.0
        return RoundReport(
            index,
            outcome.ok,
            len(outcome.contributors),
            outcome.group_size,
            outcome.weight,
            outcome.reason,
            dict(outcome.seconds),
            resynced,
        )
