"""DiLoCo: H local AdamW steps, then one outer Nesterov step on the averaged pseudo-gradient.

Every peer holds the same outer parameters ``θ`` (``outer.py``). After each block of
``local_steps`` inner steps it computes ``Δ = θ - θ_local`` and averages it with the swarm
in round ``r`` (``r`` counts rounds attempted; every peer derives the same round key from
it), weighted by the samples it trained on since its last applied round. Steps the swarm
stepped past without them (outer steps this peer adopted, or took without its own
contribution) count as one round at most, in the vector and its weight alike
(:func:`~shoal.train.outer.one_round_share`). The wire codec of the all-reduce compresses
``Δ`` (int8 blockwise by default: 4x fewer bytes than fp32, error ≤ absmax/254 per block).

The commit rule:

- **Round ok** (mean over a reported contributor set): ``θ ← Nesterov(θ, Δ̄)``, and the
  model's parameters are reset to ``θ``. Every survivor applied the same ``Δ̄`` to the same
  ``θ`` and momentum, so they stay equal.
- **Round failed / no group / too few contributors**: nothing outer changes; the model keeps
  its local progress, which the next round's pseudo-gradient includes (the samples
  accumulate too). The peer is marked *stale*; before its next round it asks
  ``resync`` whether the swarm applied a round it missed, and if so adopts that ``θ`` and
  momentum and moves its local progress onto it (``θ_local ← θ_new + θ_local - θ_old``).
  The peer takes the swarm's round index too: when that round is one this peer has not
  reached yet (it was slower), it skips it (it already holds its result) and joins the
  next one; otherwise it runs the round now under the swarm's index. Fresher means more
  outer steps applied (``applied``, ``outer.applied`` in snapshots), never a higher step:
  steps are each peer's own count (a peer that trained alone before others came is far
  ahead), and a step-ahead donor that had missed a round rolled back the round a failed
  member had applied. A failed round asks at the next two rounds at most.
- **Round ok with fewer peers than the membership view counts** (``outcome.expected``):
  applied as above, and the peer asks too. Two sides of a healed partition hold different
  ``θ`` and meet under different round keys; without asking, each side went on averaging
  with its half for good. The side behind (fewer outer steps applied) adopts the other's
  ``θ`` and meets it at the next round; of sides that applied as many steps, the one whose
  ``θ`` came from the round of fewer contributors (of as many, whose fingerprint is
  greater) adopts the other's (``OuterNesterov.tag``; snapshots announce it as their
  progress tag). A swarm larger than a group meets in several groups per round, which
  diverge alike and join the same way.
- **Skipped** (``outcome.skipped``: no other live peer could average with this one): as a
  failed round, but no round is counted, so the index of a peer that was alone does not
  run ahead of the peers that join it.

The averaging call is injected (``average(vector, weight, round_index) -> RoundOutcome``)
so the logic is tested without a network.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from shoal.errors import CheckpointError, ConfigError
from shoal.train.outer import (
    OuterConfig,
    OuterNesterov,
    OuterState,
    checked_count,
    one_round_share,
)
from shoal.train.swarm_round_config import RoundOutcome

__all__ = ["DiLoCo", "DiLoCoConfig", "ResyncState", "RoundReport"]

log = logging.getLogger(__name__)

_APPLIED = "outer.applied"

AverageFn = Callable[[torch.Tensor, float, int], RoundOutcome]


@dataclass(frozen=True, kw_only=True, slots=True)
class DiLoCoConfig:
    """DiLoCo settings."""

    local_steps: int = 50
    """H: inner AdamW steps between outer steps."""
    outer: OuterConfig = field(default_factory=OuterConfig)

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise ConfigError(f"local_steps must be >= 1, got {self.local_steps!r}")


@dataclass(frozen=True, slots=True)
class ResyncState:
    """Outer state fetched from the swarm for a stale peer."""

    round_index: int
    """Rounds attempted by the donor (the next round it joins)."""
    tensors: dict[str, torch.Tensor]
    """``OuterNesterov.state_tensors()`` of the donor."""
    step: int = 0
    """The donor snapshot's step: a later resync wants state fresher than this."""
    refuse: Callable[[], None] = field(default=lambda: None, compare=False)
    """Called when this state cannot be adopted: later resyncs pass over its snapshot."""


@dataclass(frozen=True, slots=True)
class RoundReport:
    """One round, as the loop prints and records it."""

    round_index: int
    ok: bool
    contributors: int
    group_size: int
    weight: float
    reason: str
    seconds: dict[str, float]
    resynced: bool = False


class DiLoCo:
    """Drives the outer loop around a model's parameters (call from the compute thread)."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        config: DiLoCoConfig,
        average: AverageFn,
        resync: Callable[[], ResyncState | None] | None = None,
        on_resync: Callable[[ResyncState], None] | None = None,
        fits: Callable[[dict[str, torch.Tensor]], str | None] | None = None,
    ) -> None:
        """``on_resync(state)`` runs after a resync adopted ``state``; ``fits(tensors)``
        says why the rest of a snapshot's outer state (the low-rank ``Q``) cannot go with
        its masters (None: it can), so that neither is taken without the other."""
        self.params = list(params)
        self.config = config
        self.outer = OuterNesterov(self.params, config.outer)
        self.average = average
        self.resync = resync
        self.on_resync = on_resync
        self.fits = fits
        self.round_index = 0
        """Rounds attempted so far = index of the next round."""
        self.local_steps_done = 0
        self.samples = 0
        """Samples trained since this peer's progress last went into an applied outer step."""
        self.steps_carried = 0
        """Local steps since then: what the next pseudo-gradient carries."""
        self.steps_overlapped = 0
        """Of those, the first this many: the steps before this peer's last outer step that
        left them out (adopted, or the others' mean); they count as one round at most."""
        self.applied = 0
        """Outer steps applied (or adopted from a donor that had applied more)."""
        self.stale = False
        self._asks_left = 0
        self._tied = False
        """The last resync took a state of as many outer steps (see :meth:`_loses_tie`)."""

    def after_local_step(self, samples: int) -> RoundReport | None:
        """Count one inner step; every H-th runs a round and returns its report."""
        self.local_steps_done += 1
        self.samples += samples
        self.steps_carried += 1
        if self.local_steps_done < self.config.local_steps:
            return None
        return self.run_round()

    def run_round(self) -> RoundReport:
        before = self.round_index
        resynced = self._maybe_resync()
        if resynced and self.round_index > before and not self._tied:
            # The swarm already finished this round: we now hold its result, with our local
            # progress rebased onto it, and take part again from its next round on. (A
            # state taken on a tie is no round's result: the other side runs its next round
            # from it now, so this peer joins that round.)
            self.local_steps_done = 0
            return RoundReport(
                before, False, 0, 0, 0.0, "caught up with the swarm", {}, resynced=True
            )
        delta = self.outer.pseudo_gradient(self.params)
        weight = one_round_share(
            delta, self.samples, self.steps_carried, self.steps_overlapped, self.config.local_steps
        )
        r = self.round_index
        outcome = self.average(delta, weight, r)
        self.local_steps_done = 0
        if outcome.skipped:  # alone: no round was tried, and none is counted
            return RoundReport(r, False, 0, 0, 0.0, outcome.reason, dict(outcome.seconds))
        self.round_index += 1
        if outcome.ok:
            self.applied += 1
        contributors = len(outcome.contributors)
        if outcome.ok and outcome.included:
            self.outer.step(delta, contributors)
            self.outer.load_into(self.params)
            self.carry(0, 0)
            self.stale = False
        elif outcome.ok:
            # The swarm's mean left this peer's contribution out (late, or screened): take
            # the outer step everyone takes, and keep the local progress and its samples
            # on top of it for the next round instead of dropping them.
            self.outer.keeping_progress(self.params, lambda: self.outer.step(delta, contributors))
            self.stale, self.steps_overlapped = False, self.steps_carried
        else:
            self.mark_stale()
        if outcome.ok and outcome.group_size < outcome.expected:
            # Fewer peers averaged than are live: the others may hold other outer state.
            # Two sides of a healed partition meet under different keys (the outer
            # fingerprint) and never again, each waiting out its windows for the other.
            # Ask before the next round whether the swarm holds a state ahead of ours.
            self.mark_stale()
        return RoundReport(
            r,
            outcome.ok,
            len(outcome.contributors),
            outcome.group_size,
            outcome.weight,
            outcome.reason,
            dict(outcome.seconds),
            resynced,
        )

    def mark_stale(self) -> None:
        """The swarm may have applied a round this peer did not: ask before the next two
        rounds at most (the members that applied it may not have announced it yet)."""
        self.stale, self._asks_left = True, 2

    def _maybe_resync(self) -> bool:
        self._tied = False
        if not self.stale or self.resync is None:
            return False
        self._asks_left = max(0, self._asks_left - 1)
        self.stale = self._asks_left > 0
        state = self.resync()  # only state with more outer steps applied than ours
        if state is None:
            return False
        try:
            adopted, theirs = self._read(state.tensors)
        except CheckpointError as exc:  # nothing changed; asked again while asks are left
            log.warning("refused the swarm's outer state of step %d: %s", state.step, exc)
            state.refuse()
            return False
        tied = theirs is not None and self._loses_tie(theirs, state)
        if theirs is not None and theirs <= self.applied and not tied:
            # Not ahead, though announced so: adopting it could undo a round we applied,
            # and as our count only grows, it never will be.
            state.refuse()
            return False
        self.outer.keeping_progress(self.params, lambda: self.outer.adopt(adopted))
        if not tied:  # a tie's state holds the other side's rounds instead of ours, not
            self.steps_overlapped = self.steps_carried  # rounds on top of our progress
        # Never lower it: a donor's snapshot comes from its last applied round, and the
        # swarm (like us) has counted the failed ones since; taking the snapshot's index
        # would put us on round keys one behind everyone else's for good.
        self.round_index = max(self.round_index, state.round_index)
        self.applied = theirs if theirs is not None else self.applied
        self.stale, self._tied = False, tied
        if self.on_resync is not None:
            self.on_resync(state)
        return True

    def _loses_tie(self, theirs: int, state: ResyncState) -> bool:
        """``state`` applied as many outer steps as this peer, from other outer parameters
        (two sides of a healed partition, or two groups of one round): the side whose
        :meth:`OuterNesterov.tag` is greater (fewer contributors, or as many and a greater
        fingerprint) takes the other's, an order both sides agree on, so they meet under
        one round key again."""
        if theirs != self.applied:
            return False
        other = self.outer.tag_of(state.tensors)
        return other is not None and other < self.outer.tag()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        applied = torch.tensor(self.applied, dtype=torch.int64)
        return {**self.outer.state_tensors(), _APPLIED: applied}

    def state_misfit(self, tensors: dict[str, torch.Tensor]) -> str | None:
        """Why a snapshot's outer ``tensors`` cannot be adopted (None: they can)."""
        try:
            self._read(tensors)
        except CheckpointError as exc:
            return str(exc)
        return None

    def _read(self, tensors: dict[str, torch.Tensor]) -> tuple[OuterState, int | None]:
        """The outer state in a snapshot's ``tensors`` and its count of applied outer steps
        (None: a snapshot from before the count), checked with :attr:`fits` too; raises
        ``CheckpointError``."""
        state, applied = self.outer.read_state(tensors), checked_count(tensors, _APPLIED)
        why = self.fits(tensors) if self.fits is not None else None
        if why is not None:
            raise CheckpointError(why)
        return state, applied

    def start_from_outer(self) -> None:
        """The model becomes the outer parameters: no local progress of its own."""
        self.outer.load_into(self.params)
        self.carry(0, 0)

    def load_state(self, tensors: dict[str, torch.Tensor], round_index: int) -> bool:
        """Adopt restored outer state (startup recovery); the caller restored the model.
        False, with nothing changed, when :meth:`state_misfit` names a reason."""
        try:
            adopted, applied = self._read(tensors)
        except CheckpointError:
            return False
        self.outer.adopt(adopted)
        self.applied = applied or 0
        self.round_index = round_index
        self.local_steps_done = 0
        self.carry(0, 0)  # the caller says what the restored model holds
        return True

    def carry(self, steps: int, samples: int) -> None:
        """The restored model holds ``steps`` local steps on ``samples`` samples that no
        applied round holds (a restart from this peer's own checkpoint; 0: none, as after
        a round that included them): its next pseudo-gradient carries them, and counts
        them, none of them stepped past yet."""
        self.steps_carried, self.samples, self.steps_overlapped = steps, samples, 0
