"""Streaming DiLoCo: parameter fragments synchronized at staggered times, overlapping compute.

The parameters are cut into ``F`` fragments of about equal size (whole tensors, in model
order). Fragment ``f`` has its own outer Nesterov state (``outer.py``). Every ``H`` local
steps hold ``F`` slots, at offsets ``o_k = (k + 1)·H/F`` (local step ``t`` with
``t ≡ o_k (mod H)``), and each slot synchronizes one fragment: where every round succeeds,
each fragment once per ``H`` steps (which one, below). So one fragment's worth of bytes is
in flight at a time, and peak bandwidth drops by ``F``.

**Delayed application (the exact rule).** At the sync step ``t`` the peer takes
``Δ_f = θ_f - θ_local,f(t)`` and starts its all-reduce on the network loop; the compute
thread keeps taking local steps. The result is applied at the first step boundary after it
lands, and at the latest at ``t + τ`` (``overlap_steps``; the compute thread waits there if
needed). Applying at step ``t' ≥ t``:

    θ_f ← Nesterov(θ_f, Δ̄_f)                       (the same on every contributor)
    θ_local,f ← α·θ_local,f(t') + (1 - α)·θ_f       (α = ``mix_alpha``, default 0.5)

The outer parameters depend only on ``Δ̄_f``, never on when it landed, so they stay equal
across contributors; the mix keeps part of the ``t' - t`` local steps taken meanwhile
(α = 0 discards them, as plain DiLoCo would). With ``τ = 0`` the result is awaited at
step ``t`` itself: no overlap. A failed fragment round changes nothing (local progress
kept; once the swarm's rounds of it are adopted, the steps they stepped past count as one
round at most in the fragment's next contribution: ``outer.one_round_share``) and marks the
peer stale: before its next launch it asks ``resync`` for the swarm's outer state and rebases
onto it, as ``diloco.py`` does.

Each fragment counts the rounds it applied (``outer.<f>.applied`` in snapshots). A stale
peer keeps applying the other fragments' rounds and its snapshots look fresh, while the
fragment it missed is behind; so a resync adopts a fragment only from a donor that applied
more of its rounds, never rolling back one the swarm already took.

Steps are each peer's own count and drift apart between peers, so a resync asks the swarm
for a snapshot whose counts are ahead of this peer's somewhere (``resync(ahead_of)``; the
counts are announced with snapshots), not for a higher step. Asking by step, the members
that failed a round whose other members applied it (a reducer that left after sending
some of its results) never found those members' state: the fragment stayed split, and
every round of it failed from then on.

A round that succeeds with fewer peers than are live asks too, as in ``diloco.py`` but once
a cycle at most (the ask is a DHT read on the compute thread): two sides of a healed
partition hold other fragment states and meet under other keys. Sides
with equal counts of every fragment are told apart by :meth:`StreamingDiLoCo.tag` (the
fragments' contributor counts summed, then a hash of all fragments' fingerprints, announced
with snapshots): the greater (fewer contributors, or as many and a greater hash) takes the
other's whole outer state.

Every slot launches the fragment with the fewest applied rounds (the lowest index among
equals): in a swarm where every round succeeds, that is each fragment in turn, and a
fragment whose round failed for everyone is tried again at the next slot. The choice
depends on the counts only, which every peer of one outer state shares (and a resync
brings a peer's up to the swarm's before it chooses), never on the peer's own step count:
step counts differ between peers by whatever each trained alone, and which fragment a
slot launches used to follow them. A peer that trained alone before two others came then
launched fragment ``f`` one slot away from them, round after round, each side waiting out
its window for the other (the windows grew to 40 s). Aligning the order after a round
alone (the fewest-applied fragment, then in turn) fixed that case and broke another: a
peer restarted just after a round of fragment ``f`` failed for everyone realigned to
``f`` while the swarm went on to ``f + 1``, and every round of that peer failed ("no
group formed") until it was restarted again.

A snapshot is taken right after a round is applied, often just as the next fragment's
round is launched: the swarm then applies that round moments after the snapshot. So a
snapshot names the fragment in flight (``outer.in_flight``), and a peer that takes that
fragment from it (a restore, or a resync before another fragment's launch) asks again
before it launches that fragment itself. Without this, a joiner met the members on that
fragment's previous round key, where only their old entries stood, and failed its first
round of it. When the resync that took it is the one right before the launch, the peer
launches it at once: asking again would find the same snapshot, and its key is the round
the swarm has in flight, which it joins while that round's window is open.

A failed fragment round marks that fragment (``unsettled``) and the peer stale. The
fragment is then usually the one due next (the fewest applied rounds), and the peer asks
the swarm right before choosing. The swarm runs that round without it after waiting out
its window for it, so the ask may find it not yet announced: the peer then tries the
fragment again on its old key and fails once more (while the swarm's next round waits
out a window for it), and takes the swarm's round at the slot after.

A fragment whose round fails for everyone at every try stops every fragment from
synchronizing: each slot tries it again. (When slots followed the step count, the other
fragments went on and that one never synchronized.) Nothing here moves on from it: what
a peer knows of failures is its own, and a choice made from it would set peers apart.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from shoal.errors import CheckpointError
from shoal.train.diloco import ResyncState, RoundReport
from shoal.train.outer import (
    OuterConfig,
    OuterNesterov,
    OuterState,
    checked_count,
    contributors_of,
    one_round_share,
    rank_of,
    saved_count,
)
from shoal.train.swarm_round_config import RoundOutcome, wait_outcome

__all__ = ["StreamingDiLoCo", "fragment_offsets", "split_fragments"]

log = logging.getLogger(__name__)


_IN_FLIGHT = "outer.in_flight"
LaunchFn = Callable[[torch.Tensor, float, int, int, str], "concurrent.futures.Future[RoundOutcome]"]
ResyncFn = Callable[[list[int], str], ResyncState | None]


def split_fragments(sizes: Sequence[int], fragments: int) -> list[list[int]]:
    """Indices of the tensors of each fragment: contiguous runs of about equal numel."""
    n = len(sizes)
    fragments = max(1, min(fragments, n))
    total = sum(sizes)
    out: list[list[int]] = [[] for _ in range(fragments)]
    acc = 0
    for i, size in enumerate(sizes):
        f = min(fragments - 1, int(acc * fragments / max(1, total)))
        # Leave at least one tensor for every later fragment.
        f = max(f, fragments - (n - i)) if n - i <= fragments else f
        out[f].append(i)
        acc += size
    return [frag for frag in out if frag]


def fragment_offsets(fragments: int, local_steps: int) -> list[int]:
    """Step offset (1..H) within each H-step cycle of each of the ``fragments`` slots."""
    return [max(1, (f + 1) * local_steps // fragments) for f in range(fragments)]


@dataclass(slots=True)
class _Pending:
    fragment: int
    round_label: int
    """The round's number in reports: cycles times fragments plus the slot."""
    delta: torch.Tensor
    future: concurrent.futures.Future[RoundOutcome]
    launched_at: int


class StreamingDiLoCo:
    """Per-fragment outer loops with overlapped all-reduces (call from the compute thread)."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        *,
        local_steps: int,
        fragments: int,
        overlap_steps: int,
        mix_alpha: float,
        outer: OuterConfig,
        launch: LaunchFn,
        resync: ResyncFn | None = None,
        wait_timeout_s: float = 120.0,
        stop: threading.Event | None = None,
        on_resync: Callable[[], None] | None = None,
    ) -> None:
        """``resync(ahead_of, tag_below)``: the swarm's outer state if a donor holds a
        snapshot whose fragment counts are ahead of ``ahead_of`` (this peer's) somewhere,
        or equal to them under a :meth:`tag` below ``tag_below`` (this peer's), else None.
        ``stop``: once set, a round waited for is abandoned (cancelled, counted failed)
        instead of being waited for up to ``wait_timeout_s``, and no round is launched.
        ``on_resync()``: called after a resync adopted the outer state of any fragment."""
        self.params = list(params)
        self.on_resync = on_resync
        self.stop = stop
        self.local_steps = local_steps
        self.overlap_steps = overlap_steps
        self.mix_alpha = mix_alpha
        self.launch = launch
        self.resync = resync
        self.wait_timeout_s = wait_timeout_s
        self.groups = split_fragments([p.numel() for p in self.params], fragments)
        self.offsets = fragment_offsets(len(self.groups), local_steps)
        self.outers = [OuterNesterov([self.params[i] for i in g], outer) for g in self.groups]
        self.step = 0
        """Local steps taken (drives the schedule; restored with the run's step)."""
        self.samples = [0] * len(self.groups)
        """Per fragment: samples trained since this peer's progress on it last went into an
        applied round."""
        self.steps_carried = [0] * len(self.groups)
        """Per fragment: local steps since then (what its next pseudo-gradient carries)."""
        self.steps_overlapped = [0] * len(self.groups)
        """Per fragment: of those, the steps before this peer's last outer step of it that
        left them out (adopted, or the others' mean); they count as one round at most
        (``outer.one_round_share``)."""
        self.pending: _Pending | None = None
        self.stale = False
        self._asks_left = 0
        """Resyncs a failed round still asks for (see :meth:`mark_stale`)."""
        self._next_group_ask = 0
        """Round count from which a round in a smaller group than the live swarm asks again."""
        self.resynced = False
        """A resync adopted swarm state since the last report (the next one says so)."""
        self.round_index = 0
        """Fragment rounds finished (ok or not)."""
        self.applied = [0] * len(self.groups)
        """Rounds each fragment applied (or adopted from a donor that had applied them)."""
        self.unsettled: set[int] = set()
        """Fragments asked for again right before their next launch: those whose last
        round failed, and those taken from a snapshot whose round of them was in flight
        (in both cases the swarm has most likely applied a round of them since)."""

    def fragment_params(self, f: int) -> list[torch.Tensor]:
        return [self.params[i] for i in self.groups[f]]

    def after_local_step(self, samples: int) -> list[RoundReport]:
        """Count one local step; apply landed results; launch the fragment due now (none
        once ``stop`` is set: the loop ends after this step, and the round would only be
        abandoned, after a resync's DHT read and download)."""
        self.step += 1
        self.samples = [s + samples for s in self.samples]
        self.steps_carried = [s + 1 for s in self.steps_carried]
        reports = []
        p = self.pending
        if p is not None and (p.future.done() or self.step >= p.launched_at + self.overlap_steps):
            reports.append(self._finish())
        if self.stop is not None and self.stop.is_set():
            return reports  # stopping: no new round, nor the resync before one
        phase = self.step % self.local_steps or self.local_steps
        for slot, offset in enumerate(self.offsets):
            if phase == offset:
                if self.pending is not None:  # never two fragments in flight
                    reports.append(self._finish())
                self._launch(slot)
                if self.overlap_steps == 0:  # no overlap: apply before the next step
                    reports.append(self._finish())
        return reports

    def drain(self) -> list[RoundReport]:
        """Finish the round in flight, if any (before a snapshot or at the end)."""
        return [self._finish()] if self.pending is not None else []

    def next_fragment(self) -> int:
        """The fragment the next slot launches: the one with the fewest applied rounds, the
        lowest index among equals (see the module doc)."""
        return min(range(len(self.groups)), key=lambda f: (self.applied[f], f))

    def _launch(self, slot: int) -> None:
        f = self.next_fragment()
        if self.stale or f in self.unsettled:
            self.unsettled.discard(f)  # asked for now
            self._resync()  # may bring counts (and so the choice) up to the swarm's
            f = self.next_fragment()
        # Launched now (a fragment the resync just took while in flight too: asking again
        # at once would find the same snapshot; its round key is the swarm's round's).
        self.unsettled.discard(f)
        outer = self.outers[f]
        delta = outer.pseudo_gradient(self.fragment_params(f))
        weight = one_round_share(
            delta,
            self.samples[f],
            self.steps_carried[f],
            self.steps_overlapped[f],
            self.local_steps,
        )
        index = (self.step - self.offsets[slot]) // self.local_steps
        future = self.launch(delta, weight, index, f, outer.fingerprint())
        self.pending = _Pending(f, index * len(self.groups) + slot, delta, future, self.step)

    @torch.no_grad()
    def _finish(self) -> RoundReport:
        p = self.pending
        assert p is not None
        self.pending = None
        outcome = wait_outcome(p.future, stop=self.stop, timeout_s=self.wait_timeout_s)
        if not outcome.skipped:  # alone: no round was tried, nothing to count or resync
            self.round_index += 1
        if outcome.ok:
            self.applied[p.fragment] += 1
        contributors = len(outcome.contributors)
        if outcome.ok and outcome.included:
            outer = self.outers[p.fragment]
            outer.step(p.delta, contributors)
            a = self.mix_alpha
            for param, m in zip(self.fragment_params(p.fragment), outer.master, strict=True):
                param.mul_(a).add_(m.to(param.device, param.dtype), alpha=1 - a)
            self.samples[p.fragment] = self.steps_carried[p.fragment] = 0
            self.steps_overlapped[p.fragment] = 0
        elif outcome.ok:  # our contribution was left out: keep its progress and samples
            outer = self.outers[p.fragment]
            outer.keeping_progress(
                self.fragment_params(p.fragment), lambda: outer.step(p.delta, contributors)
            )
            self.steps_overlapped[p.fragment] = self.steps_carried[p.fragment]
        elif not outcome.skipped:
            self.mark_stale()
            # The swarm may be running this round without us still (it waits out its
            # window for us), so the ask at the next launch, of another fragment, may
            # find this one still a round behind: ask again right before launching it.
            self.unsettled.add(p.fragment)
        if (
            outcome.ok
            and outcome.group_size < outcome.expected
            and self.round_index >= self._next_group_ask
        ):
            # Fewer peers than are live: the others may hold other outer state of this
            # fragment (a healed partition) and meet under other keys; ask, as diloco.py
            # does, but once a cycle at most: a peer that some member keeps missing would
            # otherwise read the DHT before every launch, on the compute thread.
            self.stale, self._asks_left = True, max(self._asks_left, 1)
            self._next_group_ask = self.round_index + len(self.groups)
        return RoundReport(
            p.round_label,
            outcome.ok,
            len(outcome.contributors),
            outcome.group_size,
            outcome.weight,
            outcome.reason,
            dict(outcome.seconds),
            resynced=self._take_resynced(),
        )

    def _take_resynced(self) -> bool:
        resynced, self.resynced = self.resynced, False
        return resynced

    def mark_stale(self) -> None:
        """The swarm may have applied a round this peer did not: ask before the next two
        launches at most (members that applied a round this one failed may not have
        announced their snapshot yet at the first). No snapshot ahead of ours then means
        the swarm applied no round this peer lacks; a round that fails again asks again.
        A failed round also asks right before its fragment's next launch (``unsettled``)."""
        self.stale, self._asks_left = True, 2

    def _resync(self) -> None:
        self._asks_left = max(0, self._asks_left - 1)
        ask, mine = self.resync, self.tag()
        state = ask(list(self.applied), mine) if ask is not None else None
        self.stale = state is None and self._asks_left > 0
        if state is None:
            return
        try:  # every fragment taken is checked before any is adopted
            donor = _applied_counts(state.tensors, len(self.outers))
            read = self._read(state.tensors, self._taken(state.tensors, donor, mine))
        except CheckpointError as exc:  # asked for again at the next launch, if asks are left
            log.warning("refused the swarm's outer state of step %d: %s", state.step, exc)
            state.refuse()
            self.stale = self._asks_left > 0
            return
        if not read:  # announced ahead, holds nothing we lack: never worth asking again
            log.info(
                "refused the swarm's outer state of step %d: its rounds %s are none ahead of %s",
                state.step,
                donor,
                self.applied,
            )
            state.refuse()
        in_flight = _in_flight(state.tensors, len(self.outers))
        for f, fragment_state in read.items():
            outer = self.outers[f]
            outer.keeping_progress(self.fragment_params(f), partial(outer.adopt, fragment_state))
            theirs = donor[f]
            if theirs is None or theirs > self.applied[f]:  # on top of ours, not a tie's
                self.steps_overlapped[f] = self.steps_carried[f]
            self.applied[f] = theirs if theirs is not None else self.applied[f]
            self.resynced = True
            if f == in_flight:
                self.unsettled.add(f)
        if read and self.on_resync is not None:
            self.on_resync()

    def _taken(
        self, tensors: dict[str, torch.Tensor], donor: list[int | None], mine: str
    ) -> list[int]:
        """The fragments to take from a donor with counts ``donor``: those it applied more
        rounds of (ours is as recent elsewhere: adopting could undo a round we applied),
        or all of them when it applied as many of each from other outer state (sides of a
        healed partition) and its tag is smaller than ``mine``."""
        theirs_tag = self.tag_of(tensors) if donor == self.applied else None
        tied = theirs_tag is not None and theirs_tag < mine
        return [
            f
            for f, theirs in enumerate(donor)
            if theirs is None or theirs > self.applied[f] or tied
        ]

    def tag(self) -> str:
        """The state :attr:`applied` reached: the fragments' contributor counts summed (more
        sort first, see ``outer.py``), then a hash of every fragment's outer parameters."""
        contributors = sum(o.contributors for o in self.outers)
        return rank_of(contributors) + _combined(o.fingerprint() for o in self.outers)

    def tag_of(self, tensors: dict[str, torch.Tensor]) -> str | None:
        """:meth:`tag` of the outer state in a snapshot's ``tensors`` (None: it does not
        fit this model)."""
        prefixes = [f"outer.{f}" for f in range(len(self.outers))]
        prints = [o.fingerprint_of(tensors, p) for o, p in zip(self.outers, prefixes, strict=True)]
        counts = [contributors_of(tensors, p) for p in prefixes]
        if any(p is None for p in prints) or any(c is None for c in counts):
            return None
        return rank_of(sum(c or 0 for c in counts)) + _combined(p or "" for p in prints)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f, outer in enumerate(self.outers):
            out.update(outer.state_tensors(prefix=f"outer.{f}"))
            out[f"outer.{f}.applied"] = torch.tensor(self.applied[f], dtype=torch.int64)
        in_flight = self.pending.fragment if self.pending is not None else -1
        out[_IN_FLIGHT] = torch.tensor(in_flight, dtype=torch.int64)
        return out

    def state_misfit(self, tensors: dict[str, torch.Tensor]) -> str | None:
        """Why :meth:`load_state` would refuse ``tensors`` (None: it takes them)."""
        try:
            self._read(tensors, range(len(self.outers)))
        except CheckpointError as exc:
            return str(exc)
        return None

    def carry(self, steps: int, samples: int) -> None:
        """The restored model holds ``steps`` local steps on ``samples`` samples that no
        applied round holds (a restart from this peer's own checkpoint; 0: none), in every
        fragment: their next pseudo-gradients carry them, and count them, none of them
        stepped past yet."""
        self.steps_carried = [steps] * len(self.groups)
        self.samples = [samples] * len(self.groups)
        self.steps_overlapped = [0] * len(self.groups)

    def start_from_outer(self) -> None:
        """Every fragment's parameters become its outer parameters (no local progress)."""
        for f, outer in enumerate(self.outers):
            outer.load_into(self.fragment_params(f))
        self.carry(0, 0)

    def load_state(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Adopt a snapshot's outer state (startup recovery): every fragment or, when one
        does not fit (:meth:`state_misfit`), none. Loading them one by one left the
        fragments before a misfit holding the snapshot's tensors, other parameters' values
        when the snapshot was cut into other fragments."""
        try:
            states = self._read(tensors, range(len(self.outers)))
        except CheckpointError:
            return False
        for f, state in states.items():
            self.outers[f].adopt(state)
        self.applied = [n or 0 for n in _applied_counts(tensors, len(self.outers))]
        in_flight = _in_flight(tensors, len(self.outers))
        self.unsettled = {in_flight} if in_flight is not None else set()
        self.carry(0, 0)  # the caller says what the restored model holds (:meth:`carry`)
        return True

    def _read(
        self, tensors: dict[str, torch.Tensor], fragments: Iterable[int]
    ) -> dict[int, OuterState]:
        """The state of each of ``fragments`` in a snapshot's ``tensors``, checked to fit.

        Raises:
            CheckpointError: one does not fit, or the snapshot holds more fragments.
        """
        extra = f"outer.{len(self.outers)}.master.0"
        if extra in tensors:
            raise CheckpointError(f"{extra}: the state has more than {len(self.outers)} fragments")
        _applied_counts(tensors, len(self.outers))  # malformed counts refuse the state
        return {f: self.outers[f].read_state(tensors, f"outer.{f}") for f in fragments}


def _combined(prints: Iterable[str]) -> str:
    return hashlib.blake2b("-".join(prints).encode(), digest_size=8).hexdigest()


def _in_flight(tensors: dict[str, torch.Tensor], fragments: int) -> int | None:
    """The fragment a snapshot says was in flight when it was taken (None: none, or no
    valid mark, e.g. a snapshot from before the mark existed)."""
    return _fragment_index(tensors, _IN_FLIGHT, fragments)


def _fragment_index(tensors: dict[str, torch.Tensor], key: str, fragments: int) -> int | None:
    """A fragment index a snapshot holds under ``key``; None if absent or invalid."""
    f = saved_count(tensors, key)
    return f if f is not None and f < fragments else None


def _applied_counts(tensors: dict[str, torch.Tensor], fragments: int) -> list[int | None]:
    """Each fragment's ``outer.<f>.applied`` count in a snapshot; None where it has none (a
    snapshot from a donor that did not count).

    Raises:
        CheckpointError: one holds something other than a count.
    """
    return [checked_count(tensors, f"outer.{f}.applied") for f in range(fragments)]
