"""Streaming DiLoCo: fragment schedule, overlap with compute, delayed application rule."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest
import torch

from shoal.train.diloco import ResyncState
from shoal.train.diloco_streaming import StreamingDiLoCo, fragment_offsets, split_fragments
from shoal.train.outer import OuterConfig, OuterNesterov, rank_of
from shoal.train.swarm_round_config import RoundOutcome


def test_split_fragments_is_contiguous_balanced_and_complete() -> None:
    sizes = [100, 10, 10, 100, 50, 50, 100, 80]
    frags = split_fragments(sizes, 4)
    assert [i for f in frags for i in f] == list(range(len(sizes)))
    assert len(frags) == 4 and all(frags)
    assert split_fragments([5, 5], 4) == [[0], [1]]
    assert fragment_offsets(4, 20) == [5, 10, 15, 20]


class Launcher:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, torch.Tensor]] = []
        self.futures: list[concurrent.futures.Future[RoundOutcome]] = []

    def __call__(self, vector, weight, index, fragment, fp):
        self.calls.append((fragment, index, vector.clone()))
        fut: concurrent.futures.Future[RoundOutcome] = concurrent.futures.Future()
        self.futures.append(fut)
        return fut


def _done(outcome: RoundOutcome) -> concurrent.futures.Future[RoundOutcome]:
    fut: concurrent.futures.Future[RoundOutcome] = concurrent.futures.Future()
    fut.set_result(outcome)
    return fut


def _model() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(6, generator=g) for _ in range(4)]


def test_rounds_overlap_compute_and_apply_by_the_delayed_rule() -> None:
    params = _model()
    launch = Launcher()
    s = StreamingDiLoCo(
        params,
        local_steps=8,
        fragments=4,
        overlap_steps=2,
        mix_alpha=0.5,
        outer=OuterConfig(),
        launch=launch,
    )
    start = [p.clone() for p in params]
    assert s.offsets == [2, 4, 6, 8]
    s.after_local_step(8)
    assert launch.calls == []
    params[0].add_(1.0)  # local progress of fragment 0 before its sync step
    s.after_local_step(8)  # step 2: fragment 0 launched, compute goes on
    assert [c[0] for c in launch.calls] == [0] and s.pending is not None
    assert torch.allclose(launch.calls[0][2], torch.full((6,), -1.0))
    params[0].add_(0.25)  # a local step taken while the all-reduce runs
    launch.futures[0].set_result(RoundOutcome(True, group_size=2))
    reports = s.after_local_step(8)  # step 3: landed -> applied now
    assert len(reports) == 1 and reports[0].ok and s.pending is None
    ref = OuterNesterov([start[0]])
    ref.step(launch.calls[0][2])
    assert torch.allclose(s.outers[0].master[0], ref.master[0])
    # theta_local <- 0.5 * local(t') + 0.5 * theta_new; local(t') = start + 1.25
    assert torch.allclose(params[0], 0.5 * (start[0] + 1.25) + 0.5 * ref.master[0])
    # Other fragments untouched by fragment 0's round.
    assert all(torch.equal(a, b) for a, b in zip(params[1:], start[1:], strict=True))


def test_unfinished_round_is_waited_for_at_the_overlap_bound_and_failure_changes_nothing() -> None:
    params = _model()
    launch = Launcher()
    s = StreamingDiLoCo(
        params,
        local_steps=8,
        fragments=4,
        overlap_steps=2,
        mix_alpha=0.5,
        outer=OuterConfig(),
        launch=launch,
        resync=lambda counts, tag: asked.append(counts),
        wait_timeout_s=0.05,
    )
    asked: list[list[int]] = []
    s.after_local_step(8)
    s.after_local_step(8)  # launch fragment 0 at step 2
    assert s.after_local_step(8) == []  # step 3: not landed, within the bound
    before = [p.clone() for p in params]
    reports = s.after_local_step(8)  # step 4: bound reached -> waited (times out), failed
    assert reports and not reports[0].ok
    assert asked == [[0, 0, 0, 0]]  # stale: asked the swarm before the next launch
    assert launch.futures[0].cancelled()
    assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True))
    # at the next offset, fragment 0 again: still the fewest applied rounds
    assert [c[0] for c in launch.calls] == [0, 0]


def _streaming(params, launch, **kw) -> StreamingDiLoCo:
    opts = dict(local_steps=4, fragments=2, overlap_steps=2, mix_alpha=0.5, outer=OuterConfig())
    return StreamingDiLoCo(params, launch=launch, **{**opts, **kw})


def test_an_error_in_a_fragment_round_costs_the_round_not_the_peer() -> None:
    launch = Launcher()
    s = _streaming(_model(), launch)
    s.after_local_step(8)
    s.after_local_step(8)  # fragment 0 launched at step 2
    launch.futures[0].set_exception(ConnectionResetError("peer reset"))
    reports = s.after_local_step(8)
    assert len(reports) == 1 and not reports[0].ok and "ConnectionResetError" in reports[0].reason
    assert s.stale and s.round_index == 1 and s.pending is None


def test_a_stop_abandons_the_round_in_flight_instead_of_waiting_for_it() -> None:
    # Waiting for it (up to the round deadline) kept a stopping peer alive for 40 s.
    launch = Launcher()
    stop = threading.Event()
    s = _streaming(_model(), launch, stop=stop, wait_timeout_s=60.0)
    s.after_local_step(8)
    s.after_local_step(8)  # fragment 0 launched at step 2, never answered
    stop.set()
    start = time.monotonic()
    reports = s.drain()
    assert time.monotonic() - start < 5.0
    assert launch.futures[0].cancelled() and len(reports) == 1 and not reports[0].ok


def test_once_stopping_a_landed_round_is_applied_and_no_round_is_launched() -> None:
    # Stop came as fragment 0's round landed: the step applied it, then launched
    # fragment 1 (after a resync, had the peer been stale) only for it to be abandoned.
    launch = Launcher()
    stop = threading.Event()
    s = _streaming(_model(), launch, stop=stop, wait_timeout_s=1.0)
    asked: list[list[int]] = []
    s.resync = lambda counts, tag: asked.append(counts)
    for _ in range(3):
        s.after_local_step(1)  # fragment 0 launched at step 2
    launch.futures[0].set_result(RoundOutcome(True, contributors=frozenset({1, 2}), group_size=2))
    s.mark_stale()
    stop.set()
    reports = s.after_local_step(1)  # step 4: fragment 1's slot
    assert [(r.ok, r.reason) for r in reports] == [(True, "")] and s.applied == [1, 0]
    assert len(launch.calls) == 1 and s.pending is None and asked == []
    assert s.drain() == []


def test_a_round_skipped_alone_is_not_counted_and_asks_no_resync() -> None:
    launch = Launcher()
    s = _streaming(_model(), launch)
    s.after_local_step(8)
    s.after_local_step(8)  # fragment 0 launched at step 2
    launch.futures[0].set_result(RoundOutcome(False, reason="alone: ...", skipped=True))
    reports = s.after_local_step(8)
    assert len(reports) == 1 and not reports[0].ok and reports[0].reason == "alone: ..."
    assert not s.stale and s.round_index == 0 and s.applied == [0, 0]


def test_no_overlap_applies_the_result_before_the_next_local_step() -> None:
    launch = Launcher()

    def landed(vector, weight, index, fragment, fp):
        fut = launch(vector, weight, index, fragment, fp)
        fut.set_result(RoundOutcome(True, contributors=frozenset({1}), weight=weight))
        return fut

    params = _model()
    s = _streaming(params, landed, overlap_steps=0)
    s.after_local_step(8)
    params[0].add_(1.0)
    reports = s.after_local_step(8)  # fragment 0 synced and applied at step 2 itself
    assert [r.ok for r in reports] == [True] and s.pending is None
    assert s.applied == [1, 0]


def test_resync_adopts_only_fragments_the_donor_applied_more_rounds_of() -> None:
    # A stale donor keeps applying other fragments' rounds, so its snapshots look fresh
    # while the fragment it missed is behind: adopting that fragment rolled back a round
    # this peer (and the swarm) had applied.
    params = _model()
    donor = _streaming([p.clone() for p in params], Launcher())
    donor.applied = [3, 1]
    donor.outers[0].master = [m + 1.0 for m in donor.outers[0].master]  # ahead on fragment 0
    donor.outers[1].master = [m - 5.0 for m in donor.outers[1].master]  # behind on fragment 1
    tensors = donor.state_tensors()
    tensors["outer.in_flight"] = torch.tensor(0)  # its round of fragment 0 in flight
    refused: list[int] = []
    state = ResyncState(round_index=8, tensors=tensors, step=30, refuse=lambda: refused.append(1))
    s = _streaming(params, Launcher(), resync=lambda *_: state)
    s.applied = [4, 2]  # ahead of it on every fragment: nothing to take, never will be
    s.stale = True
    s._resync()
    assert refused == [1] and s.applied == [4, 2]
    s.applied = [2, 2]
    own_f1 = [m.clone() for m in s.outers[1].master]
    s.stale = True
    s.steps_carried = [5, 5]
    s._resync()
    assert not s.stale and s.applied == [3, 2] and refused == [1]
    # taken while in flight, by a resync before another launch: asked for again before
    # its own launch (one right before a launch of it launches it, see the module doc)
    assert s.unsettled == {0}
    assert s.steps_overlapped == [5, 0]  # those 5 steps of fragment 0: one round at most
    # the next round line says so (it used to read resynced=False whatever was adopted)
    assert s._take_resynced() and not s._take_resynced()
    assert all(
        torch.equal(a, b) for a, b in zip(s.outers[0].master, donor.outers[0].master, strict=True)
    )
    assert all(torch.equal(a, b) for a, b in zip(s.outers[1].master, own_f1, strict=True))
    # the counts travel with checkpoints too
    restored = _streaming(_model(), Launcher())
    assert restored.load_state(s.state_tensors()) and restored.applied == [3, 2]
    tensors["outer.in_flight"] = torch.tensor(-1)
    tensors["outer.0.applied"] = torch.tensor(4)
    s._resync()  # fragment 0 adopted again, not in flight this time ...
    # ... which does not say the swarm applied no round of it since: it is still asked
    # for at its launch (the snapshot may predate the swarm's last round of it)
    assert s.applied == [4, 2] and s.unsettled == {0}


def _filled(fragments: int, fill: float) -> StreamingDiLoCo:
    """A peer whose tensor ``i`` holds ``fill + i``: a tensor taken from another is told."""
    params = [torch.full(s, fill + i) for i, s in enumerate([(8, 8), (8,)] * 4)]
    return _streaming(params, Launcher(), local_steps=8, fragments=fragments)


def _masters(s: StreamingDiLoCo) -> list[torch.Tensor]:
    return [m.clone() for o in s.outers for m in o.master]


@pytest.mark.parametrize(("mine", "theirs"), [(4, 2), (2, 4)])
def test_a_state_cut_into_other_fragments_is_refused_whole(mine: int, theirs: int) -> None:
    # Fragments were loaded one by one: those before the first misfit had already taken
    # the snapshot's tensors, other parameters' values.
    peer, donor = _filled(mine, 0.0), _filled(theirs, 100.0)
    donor.applied = [5] * theirs
    before = _masters(peer)
    assert peer.state_misfit(donor.state_tensors()) is not None
    assert not peer.load_state(donor.state_tensors())
    assert all(torch.equal(a, b) for a, b in zip(_masters(peer), before, strict=True))
    assert peer.applied == [0] * mine


def test_a_resync_adopts_every_fragment_it_takes_or_none() -> None:
    params = _model()
    donor = _streaming([p + 1.0 for p in params], Launcher())
    donor.applied = [3, 3]
    tensors = donor.state_tensors()
    tensors["outer.1.momentum.0"] = torch.zeros(5)  # fragment 1's state does not fit
    adopted: list[bool] = []
    s = _streaming(
        params,
        Launcher(),
        resync=lambda *_: ResyncState(8, tensors, 30),
        on_resync=lambda: adopted.append(True),
    )
    before, local = _masters(s), [p.clone() for p in params]
    s.mark_stale()
    s._resync()
    assert s.applied == [0, 0] and not s._take_resynced()
    assert adopted == []  # the strategy does not count a refused state as applied
    assert all(torch.equal(a, b) for a, b in zip(_masters(s), before, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(params, local, strict=True))
    assert s.stale  # refused: asked for again at the next launch


@pytest.mark.parametrize(
    "spoil",
    [
        {"outer.0.master.0": torch.full((6,), float("nan"))},
        {"outer.1.momentum.1": torch.full((6,), float("-inf"))},
        {"outer.0.applied": torch.tensor(True)},
        {"outer.1.applied": torch.tensor(2**60)},
    ],
)
def test_a_donor_state_that_is_not_finite_or_not_counted_is_refused(spoil) -> None:
    params = _model()
    donor = _streaming([p + 1.0 for p in params], Launcher())
    donor.applied = [3, 3]
    tensors = {**donor.state_tensors(), **spoil}
    refused: list[int] = []
    state = ResyncState(8, tensors, 30, refuse=lambda: refused.append(1))
    s = _streaming(params, Launcher(), resync=lambda *_: state)
    before = _masters(s)
    s.mark_stale()
    s._resync()
    assert s.applied == [0, 0] and s.stale and refused == [1]
    assert all(torch.equal(a, b) for a, b in zip(_masters(s), before, strict=True))
    assert s.state_misfit(tensors) is not None and not s.load_state(tensors)


@pytest.mark.parametrize("wins", [True, False])
def test_sides_with_equal_counts_join_the_smaller_tag_as_a_whole(wins) -> None:
    # Two sides of a healed partition applied as many rounds of every fragment, from other
    # states: the greater tag takes all of the other's fragments, the smaller keeps its own.
    sides = [_streaming(_model(), Launcher()) for _ in range(2)]
    for i, side in enumerate(sides):
        side.applied = [2, 2]
        for outer in side.outers:
            outer.master = [m + 0.1 * (i + 1) for m in outer.master]
    mine, theirs = sorted(sides, key=lambda o: o.tag(), reverse=not wins)
    asked: list[tuple[list[int], str]] = []

    def resync(ahead_of: list[int], tag_below: str) -> ResyncState:
        asked.append((ahead_of, tag_below))
        return ResyncState(round_index=4, tensors=theirs.state_tensors(), step=20)

    adopted: list[bool] = []
    s = _streaming(
        [p.clone() for p in mine.params],
        Launcher(),
        resync=resync,
        on_resync=lambda: adopted.append(True),
    )
    assert s.load_state(mine.state_tensors())
    before = s.tag()
    s.stale = True
    s.steps_carried = [3, 3]
    s._resync()
    assert asked == [([2, 2], before)] and s.applied == [2, 2]
    assert s.tag() == (before if wins else theirs.tag())
    assert s._take_resynced() is not wins
    # the other side's rounds instead of ours, not on top of them: progress goes whole
    assert s.steps_overlapped == [0, 0]
    assert adopted == ([] if wins else [True])  # told only when it took something
    theirs.applied = [2, 1]  # behind on one fragment: no tie, and nothing ahead to take
    s = _streaming([p.clone() for p in mine.params], Launcher(), resync=resync)
    assert s.load_state(mine.state_tensors())
    s._resync()
    assert s.tag() == mine.tag()


@pytest.mark.parametrize("mine", [4, 2])
def test_of_sides_with_equal_counts_the_one_of_fewer_contributors_yields(mine) -> None:
    # A group of four and a pair that went apart in one round hold as many rounds of every
    # fragment: by the hash alone, which side yielded was a coin toss.
    def side(shift: float, contributors: int) -> StreamingDiLoCo:
        s = _streaming(_model(), Launcher())
        s.applied = [2, 2]
        for outer in s.outers:
            outer.master = [m + shift for m in outer.master]
            outer.contributors = contributors
        return s

    many = side(0.1, 4)
    rank = len(rank_of(0))  # the hash follows the rank
    few = next(
        f for f in (side(0.1 * k, 2) for k in range(2, 50)) if f.tag()[rank:] < many.tag()[rank:]
    )  # the four's hash is the greater: ordered by it alone, they would yield
    assert many.tag() < few.tag()
    ours, theirs = (many, few) if mine == 4 else (few, many)
    state = ResyncState(round_index=4, tensors=theirs.state_tensors(), step=20)
    s = _streaming([p.clone() for p in ours.params], Launcher(), resync=lambda *_: state)
    assert s.load_state(ours.state_tensors()) and s.tag() == ours.tag()
    s.stale = True
    s._resync()
    assert s.tag() == many.tag() and s._take_resynced() is (mine == 2)


def test_a_peer_restored_mid_round_resyncs_before_it_launches_the_fragment_that_was_in_flight() -> (
    None
):
    # Snapshots are taken right after a round applies, when the next fragment's round has
    # just been launched. A joiner restored from one met the swarm on that fragment's old
    # round key (only the members' stale entries stood there) and failed its first round.
    donor_launch = Launcher()
    donor = _streaming(_model(), donor_launch)
    donor.after_local_step(8)
    donor.after_local_step(8)  # fragment 0 launched at step 2, still in flight
    snapshot = donor.state_tensors()
    donor_launch.futures[0].set_result(RoundOutcome(True, group_size=2, weight=16.0))
    donor.after_local_step(8)  # the swarm applies it after the snapshot was taken
    assert donor.applied == [1, 0]
    swarm = ResyncState(round_index=1, tensors=donor.state_tensors(), step=3)

    asked: list[tuple[int, list[int]]] = []

    def resync(ahead_of: list[int], tag_below: str) -> ResyncState:
        asked.append((joiner.step, ahead_of))
        return swarm

    launched: list[int] = []

    def alone(vector, weight, index, fragment, fp):  # rounds that change nothing
        launched.append(fragment)
        fut: concurrent.futures.Future[RoundOutcome] = concurrent.futures.Future()
        fut.set_result(RoundOutcome(False, reason="alone", skipped=True))
        return fut

    joiner = _streaming(_model(), alone, resync=resync)
    assert joiner.load_state(snapshot) and joiner.unsettled == {0} and joiner.applied == [0, 0]
    joiner.step = 2
    joiner.after_local_step(8)
    joiner.after_local_step(8)  # step 4: fragment 0 is due (fewest rounds) -> resync first
    # for state ahead of its counts: its own step says nothing (its rounds of other
    # fragments make its state look fresh, and steps drift apart between peers)
    assert asked == [(4, [0, 0])] and joiner.applied[0] == 1 and joiner.unsettled == set()
    assert launched == [1]  # fragment 0 taken, so fragment 1 is the one due
    assert all(
        torch.equal(a, b)
        for a, b in zip(joiner.outers[0].master, donor.outers[0].master, strict=True)
    )
    for _ in range(4):
        joiner.after_local_step(8)  # settled: the launches after ask nothing
    assert asked == [(4, [0, 0])] and launched == [1, 1, 1]
    # snapshots without the mark (older ones, or none in flight) ask for nothing
    assert _streaming(_model(), Launcher()).load_state(donor.state_tensors())
    legacy = {k: v for k, v in snapshot.items() if k != "outer.in_flight"}
    restored = _streaming(_model(), Launcher())
    assert restored.load_state(legacy) and restored.unsettled == set()


def test_a_failed_round_asks_the_swarm_at_the_next_two_launches_at_most():
    # Asked once, a member that failed a round others applied asked before they had
    # announced their snapshot, found nobody ahead, and failed that fragment's next round.
    asked: list[list[int]] = []
    outcomes = iter([RoundOutcome(False, reason="reducer left")])

    def launch(vector, weight, index, fragment, fp):
        fut: concurrent.futures.Future[RoundOutcome] = concurrent.futures.Future()
        fut.set_result(next(outcomes, RoundOutcome(False, reason="alone", skipped=True)))
        return fut

    s = _streaming(_model(), launch, resync=lambda counts, tag: asked.append(counts))
    for _ in range(12):  # launches at steps 2, 4, 6, 8, 10, 12; the first round fails
        s.after_local_step(8)
    assert asked == [[0, 0], [0, 0]] and not s.stale


def test_a_round_in_a_group_smaller_than_the_live_swarm_asks_too():
    # Sides of a healed partition hold other fragment states and meet under other keys;
    # each side's rounds succeed with its half only, and without asking never join.
    asked: list[list[int]] = []
    outcomes = iter([RoundOutcome(True, group_size=2, expected=4)])

    def launch(vector, weight, index, fragment, fp):
        fut: concurrent.futures.Future[RoundOutcome] = concurrent.futures.Future()
        fut.set_result(next(outcomes, RoundOutcome(True, group_size=4, expected=4)))
        return fut

    s = _streaming(_model(), launch, resync=lambda counts, tag: asked.append(counts))
    for _ in range(8):  # launches at steps 2, 4, 6, 8 (in flight): the first is the half one
        s.after_local_step(8)
    assert asked == [[1, 0]] and s.applied == [2, 1] and not s.stale  # asked at the next launch
    # Every round in a smaller group (a member that is always late): once a cycle at most.
    asked.clear()
    s = _streaming(_model(), lambda *a: _done(RoundOutcome(True, group_size=2, expected=4)))
    s.resync = lambda counts, tag: asked.append(counts)
    for _ in range(16):  # 8 launches of 2 fragments: one ask a cycle, not one a launch
        s.after_local_step(8)
    assert len(asked) == 4, asked


def test_every_slot_launches_the_fragment_with_the_fewest_applied_rounds():
    # The choice follows the counts, which the peers of one outer state share, not the
    # peer's own step count. Slots used to launch fragments in turn from the peer's step,
    # realigned after a round alone: a peer restarted just after a round of fragment 1
    # failed for everyone (counts [7, 6, 6, 6]) realigned to fragment 1 while the swarm
    # went on to fragment 2, and failed every round after ("no group formed").
    failed = RoundOutcome(False, reason="parts missing")
    skipped = RoundOutcome(False, reason="alone", skipped=True)
    ok = RoundOutcome(True, group_size=2)

    def run(step: int, outcomes: list[RoundOutcome]) -> list[int]:
        launched: list[int] = []
        plan = iter(outcomes)

        def launch(vector, weight, index, fragment, fp):
            launched.append(fragment)
            return _done(next(plan))

        s = _streaming(_model(), launch, local_steps=8, fragments=4, overlap_steps=0)
        s.applied, s.step = [7, 6, 6, 6], step
        while len(launched) < len(outcomes):
            s.after_local_step(8)
        return launched

    # the swarm: fragment 1's round fails for everyone and is tried again at the next slot
    assert run(0, [failed, ok, ok, ok, ok]) == [1, 1, 2, 3, 0]
    # a peer restarted with the same counts, alone at first: the same order
    assert run(3, [skipped, skipped, ok, ok, ok, ok]) == [1, 1, 1, 2, 3, 0]


def test_a_member_behind_on_a_fragment_takes_the_swarm_s_round_and_launches_what_it_does():
    # The swarm applied fragment 1's round this member failed: the member's counts say 1
    # is due, the swarm's say 2. The ask before the choice brings the counts (and so the
    # choice) up to the swarm's.
    swarm = _streaming(_model(), Launcher(), local_steps=8, fragments=4)
    swarm.applied = [7, 7, 6, 6]
    assert swarm.next_fragment() == 2
    launched: list[int] = []

    def launch(vector, weight, index, fragment, fp):
        launched.append(fragment)
        return _done(RoundOutcome(True, group_size=2))

    state = ResyncState(round_index=9, tensors=swarm.state_tensors(), step=40)
    member = _streaming(_model(), launch, local_steps=8, fragments=4, overlap_steps=0)
    member.resync = lambda ahead_of, tag_below: state
    member.applied, member.stale = [7, 6, 6, 6], True
    for _ in range(2):
        member.after_local_step(8)
    assert launched == [2] and member.applied == [7, 7, 7, 6]


def test_a_snapshot_of_the_step_based_schedule_loads_and_its_rotation_is_ignored():
    old = _streaming(_model(), Launcher(), local_steps=8, fragments=4)
    old.applied = [7, 6, 7, 7]
    tensors = {**old.state_tensors(), "outer.rotation": torch.tensor(3)}
    s = _streaming(_model(), Launcher(), local_steps=8, fragments=4)
    assert s.state_misfit(tensors) is None and s.load_state(tensors)
    assert s.next_fragment() == 1 and s.tag() == old.tag()


def test_a_member_that_failed_a_fragment_round_asks_before_it_tries_that_fragment_again():
    # A member one round behind on fragment 0 met the swarm on its previous round key and
    # failed at once; the swarm then ran that round without it, waiting out its window. The
    # member's next slot is that fragment again (fewest applied rounds): it asks first, and
    # until the swarm has announced the round it gets nothing ahead and fails again; then it
    # takes the round and goes on with the swarm's next fragment.
    donor = _streaming(_model(), Launcher())
    behind = ResyncState(round_index=1, tensors=donor.state_tensors(), step=2)
    donor.applied = [1, 0]
    caught_up = ResyncState(round_index=2, tensors=donor.state_tensors(), step=4)
    asked: list[tuple[int, list[int]]] = []
    swarm = {"state": behind}

    def resync(ahead_of: list[int], tag_below: str) -> ResyncState:
        asked.append((s.step, list(ahead_of)))
        return swarm["state"]

    launched: list[int] = []

    def launch(vector, weight, index, fragment, fp):
        launched.append(fragment)
        ok = len(launched) > 2  # the first two rounds of fragment 0 fail for this member
        return _done(RoundOutcome(True, group_size=2) if ok else RoundOutcome(False, reason="x"))

    s = _streaming(_model(), launch, resync=resync, overlap_steps=0)
    for _ in range(4):  # steps 2 and 4: fragment 0 fails; the ask at 4 finds nothing ahead
        s.after_local_step(8)
    assert launched == [0, 0] and [step for step, _ in asked] == [4]
    swarm["state"] = caught_up  # announced once the swarm applied it
    for _ in range(2):  # step 6: asks again, takes the round, launches fragment 1
        s.after_local_step(8)
    assert [step for step, _ in asked] == [4, 6] and launched == [0, 0, 1]
    assert s.applied == [1, 1]


@pytest.mark.parametrize("included", [True, False])
def test_an_applied_fragment_round_records_its_contributors(included) -> None:
    # The count ranks sides that applied as many rounds: it is the round's, whether this
    # peer's own contribution was in it or left out (it takes the same outer step).
    three = RoundOutcome(True, group_size=3, contributors=frozenset(range(3)), included=included)
    s = _streaming(_model(), lambda *a: _done(three), overlap_steps=0)
    for _ in range(2):  # step 2: fragment 0's round applies
        s.after_local_step(8)
    assert [o.contributors for o in s.outers] == [3, 0]
    restored = _streaming(_model(), Launcher())
    assert restored.load_state(s.state_tensors()) and restored.tag() == s.tag()
    older = {k: v for k, v in s.state_tensors().items() if not k.endswith(".contributors")}
    assert restored.load_state(older) and [o.contributors for o in restored.outers] == [0, 0]


def test_a_fragment_s_contribution_over_rounds_it_missed_is_scaled_to_one_round() -> None:
    """H = 4, 2 fragments, a slot every 2 steps. Fragment 0 is left out of its rounds at
    steps 2 and 8: the swarm steps without this peer, which keeps its progress. At step 8
    its vector carries 8 steps, the first 2 left out of a round (less than a round): all
    go. At step 12 it carries 12, the first 8 left out: those count as 4, so 8 steps' worth
    goes, with 8 steps' samples. Fragment 1's round at step 4 fails with no swarm round
    adopted since: at step 6 (tried again) it carries its 6 steps whole (nobody else holds
    them)."""
    params = _model()
    sent: list[tuple[int, float, float]] = []
    rounds_of_0 = iter([False, False, True])
    rounds_of_1 = iter([False, True, True])

    def launch(vector, weight, index, fragment, fp):
        sent.append((fragment, vector[0].item(), weight))
        vector.zero_()  # the mean: no outer movement, to keep the sums simple
        if fragment == 1 and not next(rounds_of_1):
            return _done(RoundOutcome(False, reason="no group"))
        included = next(rounds_of_0) if fragment == 0 else True
        return _done(RoundOutcome(True, group_size=3, included=included))

    s = _streaming(params, launch, overlap_steps=0, outer=OuterConfig(lr=1.0, momentum=0.0))
    for _ in range(12):
        params[0].sub_(1.0)  # fragment 0 moves by 1 per local step
        s.after_local_step(8)
    frag0 = [(v, w) for f, v, w in sent if f == 0]
    assert [f for f, _, _ in sent] == [0, 1, 1, 0, 1, 0]
    assert frag0 == [(2.0, 16.0), (8.0, 64.0), (8.0, 64.0)]
    assert [w for f, _, w in sent if f == 1] == [32.0, 48.0, 32.0]
    assert s.samples[0] == 0 and s.steps_overlapped == [0, 0]  # included at step 12
