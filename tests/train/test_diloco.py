"""DiLoCo outer step math and the commit rule of a round (no network)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from shoal.errors import ConfigError
from shoal.train.diloco import DiLoCo, DiLoCoConfig, ResyncState
from shoal.train.outer import OuterConfig, OuterNesterov, rank_of
from shoal.train.swarm_round_config import RoundOutcome


def test_outer_nesterov_matches_hand_computation() -> None:
    p = torch.tensor([1.0, -2.0, 0.5])
    outer = OuterNesterov([p], OuterConfig(lr=0.7, momentum=0.9))
    # Round 1: local params moved to p1; delta = theta - p1.
    d1 = torch.tensor([0.1, -0.2, 0.0])
    outer.step(d1)
    # b1 = d1; theta1 = theta0 - 0.7 * (d1 + 0.9 * b1) = theta0 - 0.7 * 1.9 * d1
    expected1 = torch.tensor([1.0 - 0.133, -2.0 + 0.266, 0.5])
    assert torch.allclose(outer.master[0], expected1, atol=1e-6)
    d2 = torch.tensor([0.05, 0.0, -0.1])
    outer.step(d2)
    b2 = 0.9 * d1 + d2
    expected2 = expected1 - 0.7 * (d2 + 0.9 * b2)
    assert torch.allclose(outer.master[0], expected2, atol=1e-6)
    assert torch.allclose(outer.momentum[0], b2, atol=1e-7)


def test_pseudo_gradient_and_torch_sgd_agree() -> None:
    torch.manual_seed(0)
    theta = torch.randn(4, 3)
    local = theta + 0.01 * torch.randn(4, 3)
    outer = OuterNesterov([theta])
    delta = outer.pseudo_gradient([local])
    assert torch.allclose(delta, (theta - local).reshape(-1))
    ref = theta.clone().requires_grad_(True)
    sgd = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(3):
        ref.grad = delta.view(4, 3).clone()
        sgd.step()
        outer.step(delta)
    assert torch.allclose(outer.master[0], ref.detach(), atol=1e-6)


def test_outer_config_checks() -> None:
    with pytest.raises(ConfigError, match=r"outer\.lr"):
        OuterConfig(lr=0.0)
    with pytest.raises(ConfigError, match="momentum"):
        OuterConfig(momentum=1.0)


def test_the_fingerprint_is_hashed_again_only_after_the_masters_change(monkeypatch) -> None:
    from shoal.train import outer as outer_module

    hashed = []
    real = outer_module._fingerprint
    monkeypatch.setattr(
        outer_module, "_fingerprint", lambda masters: hashed.append(1) or real(masters)
    )
    params = [torch.randn(5), torch.randn(2, 3)]
    outer = OuterNesterov(params, OuterConfig(lr=1.0, momentum=0.0))
    prints = []

    def fingerprint_twice() -> str:
        before = len(hashed)
        first, again = outer.fingerprint(), outer.fingerprint()
        assert first == again == real(outer.master) and len(hashed) - before == 1
        assert first not in prints
        prints.append(first)
        return first

    fingerprint_twice()
    outer.step(torch.ones(11))  # an outer step writes the masters in place
    fingerprint_twice()
    outer.master[1][0, 0] = 7.0  # through a view, as any in-place write
    fingerprint_twice()
    outer.master[1].detach().add_(1.0)  # through a detached alias
    fingerprint_twice()
    outer.master[0] = outer.master[0] + 1.0  # an element replaced in the list
    fingerprint_twice()
    outer.master = [m * 2 for m in outer.master]  # the list replaced
    fingerprint_twice()
    outer.master[1].data = torch.randn(2, 3)  # the storage replaced
    fingerprint_twice()
    other = OuterNesterov([torch.randn(5), torch.randn(2, 3)])
    assert outer.load_state_tensors(other.state_tensors())  # a resync or a restore
    assert fingerprint_twice() == real(other.master)


def _unused(vector: torch.Tensor, weight: float, index: int) -> RoundOutcome:
    raise AssertionError("replaced before the round")


def _peer_params(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, generator=g), torch.randn(2, 3, generator=g)]


def test_failed_peer_leaves_survivors_equal_to_mean_over_contributors() -> None:
    start = _peer_params(0)
    n, dead = 4, {2}
    peers: list[DiLoCo] = []
    params: list[list[torch.Tensor]] = []
    for _ in range(n):
        ps = [t.clone() for t in start]
        params.append(ps)
        peers.append(DiLoCo(ps, DiLoCoConfig(local_steps=2), _unused))
    # Local training moves each peer differently (with different sample counts).
    for rank, ps in enumerate(params):
        g = torch.Generator().manual_seed(100 + rank)
        for p in ps:
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    before = [[p.clone() for p in ps] for ps in params]
    # Collect contributions first (pseudo-gradients are computed from the params).
    deltas = {r: peers[r].outer.pseudo_gradient(params[r]) for r in range(n)}
    weights = {r: float(10 * (r + 1)) for r in range(n)}
    alive = [r for r in range(n) if r not in dead]
    mean = sum(deltas[r] * weights[r] for r in alive) / sum(weights[r] for r in alive)

    for rank in range(n):

        def average(vector, weight, index, rank=rank):
            if rank in dead:
                return RoundOutcome(False, reason="peer died")
            assert torch.equal(vector, deltas[rank])
            vector.copy_(mean)  # what the all-reduce writes on success
            return RoundOutcome(True, weight=sum(weights[r] for r in alive), group_size=n)

        peers[rank].average = average
        peers[rank].samples = int(weights[rank]) - 2
        peers[rank].after_local_step(1)
        report = peers[rank].after_local_step(1)
        assert report is not None and report.ok is (rank not in dead)
    survivors = [params[r] for r in alive]
    for ps in survivors[1:]:
        for a, b in zip(ps, survivors[0], strict=True):
            assert torch.equal(a, b)
    # Equal to one outer Nesterov step from the common start with the contributors' mean.
    ref = OuterNesterov(start)
    ref.step(mean)
    for a, b in zip(survivors[0], ref.master, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    # The failed peer kept its local progress and is marked stale.
    for a, b in zip(params[2], before[2], strict=True):
        assert torch.equal(a, b)
    assert peers[2].stale and peers[2].round_index == 1


def test_stale_peer_resyncs_onto_the_swarm_and_keeps_its_local_progress() -> None:
    start = _peer_params(1)
    donor = OuterNesterov(start)
    donor.step(torch.full((11,), 0.01))

    def failing(vector, weight, index):
        return RoundOutcome(False, reason="no group")

    seen: list[tuple[torch.Tensor, float]] = []

    def ok(vector, weight, index):
        seen.append((vector.clone(), weight))
        return RoundOutcome(True, group_size=2)

    ps = [t.clone() for t in start]
    d = DiLoCo(
        ps, DiLoCoConfig(local_steps=1), failing, lambda: ResyncState(1, donor.state_tensors())
    )
    ps[0].add_(0.5)
    assert not d.after_local_step(4).ok  # type: ignore[union-attr]
    local_progress = [p - m for p, m in zip(ps, d.outer.master, strict=True)]
    d.average = ok
    report = d.after_local_step(4)
    assert report is not None and report.resynced and report.round_index == 1
    # The pseudo-gradient sent after the resync is the local progress, rebased, and scaled
    # to one round: it spans two local steps (H = 1), one of them under a round the swarm
    # applied, so half of it goes, with half its 8 samples as weight.
    expected = torch.cat([(-lp).reshape(-1) for lp in local_progress])
    vector, weight = seen[0]
    assert torch.allclose(vector, expected / 2, atol=1e-6)
    assert weight == 4.0


def test_a_round_with_fewer_peers_than_live_asks_whether_the_swarm_is_ahead() -> None:
    # Two sides of a healed partition each average with their half, under different round
    # keys (their outer parameters differ): the side behind must find the other and join
    # it, or the swarm stays split for good.
    start = _peer_params(5)
    other_side = OuterNesterov(start)
    for _ in range(3):  # the other half applied three rounds meanwhile
        other_side.step(torch.full((11,), 0.03))
    asked: list[int] = []

    def resync() -> ResyncState:
        asked.append(1)
        tensors = {**other_side.state_tensors(), "outer.applied": torch.tensor(3)}
        return ResyncState(3, tensors)

    def half(vector, weight, index):  # ok, with 2 of the 4 live peers
        return RoundOutcome(True, group_size=2, expected=4)

    ps = [t.clone() for t in start]
    d = DiLoCo(ps, DiLoCoConfig(local_steps=1), half, resync)
    assert d.after_local_step(4).ok and d.applied == 1 and d.stale  # type: ignore[union-attr]
    d.average = lambda vector, weight, index: RoundOutcome(True, group_size=4, expected=4)
    report = d.after_local_step(4)  # takes the other side's state (and its round)
    assert asked == [1] and report is not None and report.resynced and d.applied == 3
    assert all(torch.equal(a, b) for a, b in zip(d.outer.master, other_side.master, strict=True))
    report = d.after_local_step(4)  # then averages with everyone, and asks nothing
    assert report is not None and report.ok and not report.resynced
    assert asked == [1] and not d.stale and d.applied == 4


@pytest.mark.parametrize("wins", [True, False])
def test_sides_that_applied_as_many_rounds_join_the_smaller_fingerprint(wins) -> None:
    # Both halves of a healed partition applied one round since the split: neither is
    # ahead, so each stayed with its half for good. Now the greater fingerprint yields.
    start = _peer_params(5)
    sides = [OuterNesterov(start), OuterNesterov(start)]
    for i, side in enumerate(sides):
        side.step(torch.full((11,), 0.01 * (i + 1)))
    mine, theirs = sorted(sides, key=lambda o: o.fingerprint(), reverse=not wins)
    local_progress = torch.full((2, 3), 0.5)
    ps = [m.clone() for m in mine.master]  # this peer: its side's state, one round applied
    d = DiLoCo(ps, DiLoCoConfig(local_steps=1), lambda v, w, i: RoundOutcome(True))
    d.outer.load_state_tensors(mine.state_tensors())
    d.applied, d.round_index = 1, 1
    ps[1].sub_(local_progress)  # local steps since
    tensors = {**theirs.state_tensors(), "outer.applied": torch.tensor(1)}
    d.resync = lambda: ResyncState(5, tensors)  # the other side counted more attempts
    d.mark_stale()
    seen: list[tuple[str, torch.Tensor]] = []  # the outer state a round starts from, Δ

    def average(vector, weight, index):
        seen.append((d.outer.fingerprint(), vector.clone()))
        return RoundOutcome(True)

    d.average = average
    report = d.after_local_step(4)
    # Taken on a tie, the state is no round's result: the round runs now, from it.
    assert report is not None and report.ok and report.resynced is not wins
    assert report.round_index == (1 if wins else 5) and len(seen) == 1
    kept = mine if wins else theirs
    assert seen[0][0] == kept.fingerprint() and d.applied == 2
    # Either way the local progress travels on top of the outer state held.
    assert torch.allclose(seen[0][1][5:], local_progress.reshape(-1), atol=1e-6)


def _ranked_against_fingerprints(start, more: int, fewer: int):
    """Two outer states one step from ``start``: the one of ``more`` contributors has the
    greater fingerprint, so ordering by fingerprint alone would make it yield."""
    many = OuterNesterov(start)
    many.step(torch.full((11,), 0.01), contributors=more)
    for k in range(2, 50):
        few = OuterNesterov(start)
        few.step(torch.full((11,), 0.01 * k), contributors=fewer)
        if few.fingerprint() < many.fingerprint():
            return many, few
    raise AssertionError("no pair of states ordered against their fingerprints")


def test_an_outer_state_records_its_round_s_contributors_and_ranks_by_them() -> None:
    start = _peer_params(5)
    many, few = _ranked_against_fingerprints(start, more=4, fewer=2)
    assert many.contributors == 4 and many.tag() < few.tag()  # more contributors first
    restored = OuterNesterov(start)
    assert restored.load_state_tensors(many.state_tensors())
    assert restored.contributors == 4 and restored.tag() == many.tag()
    assert restored.tag_of(few.state_tensors()) == few.tag()
    older = {k: v for k, v in few.state_tensors().items() if k != "outer.contributors"}
    assert restored.tag_of(older) == rank_of(0) + few.fingerprint()  # from before the count
    assert restored.load_state_tensors(older) and restored.contributors == 0
    bad = {**few.state_tensors(), "outer.contributors": torch.tensor(0.5)}
    assert restored.tag_of(bad) is None and not restored.load_state_tensors(bad)


@pytest.mark.parametrize("mine", [4, 2])
def test_of_sides_that_applied_as_many_rounds_the_one_of_fewer_contributors_yields(mine) -> None:
    # One round's ready peers went apart as a group of four and a pair (two late
    # restarters met under the key the four had left). Ordered by fingerprint alone,
    # which side yielded was a coin toss: the four could throw their own step away.
    start = _peer_params(5)
    many, few = _ranked_against_fingerprints(start, more=4, fewer=2)
    ours, theirs = (many, few) if mine == 4 else (few, many)
    ps = [m.clone() for m in ours.master]
    d = DiLoCo(ps, DiLoCoConfig(local_steps=1), lambda v, w, i: RoundOutcome(True))
    assert d.outer.load_state_tensors(ours.state_tensors())
    d.applied, d.round_index = 1, 1
    tensors = {**theirs.state_tensors(), "outer.applied": torch.tensor(1)}
    d.resync = lambda: ResyncState(1, tensors)
    d.mark_stale()
    starts: list[str] = []

    def average(vector, weight, index):
        starts.append(d.outer.fingerprint())
        return RoundOutcome(True, contributors=frozenset(range(6)))

    d.average = average
    report = d.after_local_step(4)
    assert report is not None and report.ok and report.resynced is (mine == 2)
    assert starts == [many.fingerprint()]  # both sides go on from the four's state
    assert d.outer.contributors == 6  # the round just applied


def test_a_member_left_out_of_a_round_records_its_contributors_too() -> None:
    ps = _peer_params(3)
    left_out = RoundOutcome(True, contributors=frozenset(range(5)), included=False)
    d = DiLoCo(ps, DiLoCoConfig(local_steps=1), lambda v, w, i: left_out)
    report = d.after_local_step(4)
    assert report is not None and report.ok and d.outer.contributors == 5


def test_failed_round_keeps_samples_and_local_params() -> None:
    ps = _peer_params(2)
    d = DiLoCo(ps, DiLoCoConfig(local_steps=3), lambda v, w, i: RoundOutcome(False, reason="x"))
    ps[1].add_(1.0)
    snapshot = [p.clone() for p in ps]
    assert d.after_local_step(8) is None
    assert d.after_local_step(8) is None
    report = d.after_local_step(8)
    assert report is not None and not report.ok
    assert d.samples == 24 and d.local_steps_done == 0
    assert all(torch.equal(a, b) for a, b in zip(ps, snapshot, strict=True))


def _sent_after(outcomes: list[RoundOutcome], *, resync: ResyncState | None = None):
    """A peer with H = 2 that moves its parameters by 1 per local step (4 samples each)
    and meets ``outcomes`` round after round (a resync, if any, offers ``resync`` once):
    the vectors and weights it sent."""
    ps = [torch.zeros(3)]
    offers = [resync] if resync is not None else []
    sent: list[tuple[torch.Tensor, float]] = []
    plan = iter(outcomes)

    def average(vector, weight, index):
        sent.append((vector.clone(), weight))
        outcome = next(plan)
        if outcome.ok:
            vector.zero_()  # the others' mean: no outer movement, to keep the sums simple
        return outcome

    d = DiLoCo(
        ps,
        DiLoCoConfig(local_steps=2, outer=OuterConfig(lr=1.0, momentum=0.0)),
        average,
        lambda: offers.pop() if offers else None,
    )
    for _ in range(2 * len(outcomes)):
        ps[0].sub_(1.0)  # Δ grows by 1 per local step
        d.after_local_step(4)
    return d, sent


def test_steps_the_swarm_stepped_past_without_them_count_as_one_round_at_most() -> None:
    """Left out twice (the swarm stepped without this peer, which kept its progress). The
    second contribution carries 4 local steps, the first 2 of them left out of a round:
    one round's worth, so all of it goes. The third carries 6, the first 4 of them left
    out: those count as 2, so it goes as 4 steps' worth with 4 steps' samples. Whole, it
    outweighed the round's other members, on top of an outer state that already held the
    swarm's progress of those rounds."""
    left_out = RoundOutcome(True, group_size=3, included=False)
    d, sent = _sent_after([left_out, left_out, RoundOutcome(True, group_size=3)])
    assert [w for _, w in sent] == [8.0, 16.0, 16.0]
    assert [v[0].item() for v, _ in sent] == [2.0, 4.0, 4.0]
    assert d.samples == d.steps_carried == d.steps_overlapped == 0  # included: none carried


def test_progress_nobody_applied_anything_over_is_sent_whole() -> None:
    """Failed rounds with no swarm round adopted since (the peer was cut off, or alone):
    nobody holds that progress, and all of it goes, with all its samples."""
    failed = RoundOutcome(False, reason="no group")
    _, sent = _sent_after([failed, failed, RoundOutcome(True, group_size=2)])
    assert [w for _, w in sent] == [8.0, 16.0, 24.0]
    assert [v[0].item() for v, _ in sent] == [2.0, 4.0, 6.0]


def test_after_adopting_the_swarm_s_round_the_progress_is_scaled_to_one_round() -> None:
    donor = OuterNesterov([torch.zeros(3)], OuterConfig(lr=1.0, momentum=0.0))
    donor.step(torch.zeros(3))  # one round applied, same parameters: rebasing moves nothing
    offer = ResyncState(1, {**donor.state_tensors(), "outer.applied": torch.tensor(1)})
    failed = RoundOutcome(False, reason="no group")
    d, sent = _sent_after([failed, RoundOutcome(True, group_size=2)], resync=offer)
    assert d.applied == 2  # the adopted round, then its own
    assert [w for _, w in sent] == [8.0, 8.0]
    assert [v[0].item() for v, _ in sent] == [2.0, 2.0]


def test_steps_trained_alone_after_an_adopted_round_count_whole() -> None:
    """Failed at step 2, adopted the swarm's round at step 4 (those 4 steps count as 2),
    then alone for three rounds (6 steps nobody else holds): 8 of its 10 steps go."""
    donor = OuterNesterov([torch.zeros(3)], OuterConfig(lr=1.0, momentum=0.0))
    donor.step(torch.zeros(3))
    offer = ResyncState(1, {**donor.state_tensors(), "outer.applied": torch.tensor(1)})
    failed = RoundOutcome(False, reason="no group")
    alone = RoundOutcome(False, reason="alone", skipped=True)
    plan = [failed, alone, alone, alone, RoundOutcome(True, group_size=2)]
    _, sent = _sent_after(plan, resync=offer)
    assert [v[0].item() for v, _ in sent] == [2.0, 2.0, 4.0, 6.0, 8.0]
    assert [w for _, w in sent] == [8.0, 8.0, 16.0, 24.0, 32.0]


@pytest.mark.parametrize("swarm_ahead", [False, True])
def test_progress_restored_from_its_own_checkpoint_is_carried_and_counted(swarm_ahead) -> None:
    """A restart from this peer's disk restores a model holding steps no applied round
    holds: they are counted, and when the swarm's rounds are adopted over them at the
    restart's resync, they go as one round's worth. (Counted from 0, a restarted peer sent
    many rounds of progress at one round's weight, or, once adopted over, unscaled.)"""
    ps = [torch.zeros(3)]
    donor = OuterNesterov([torch.zeros(3)])
    donor.step(torch.zeros(3))
    offers = [ResyncState(0, {**donor.state_tensors(), "outer.applied": torch.tensor(1)})]
    sent: list[tuple[float, float]] = []

    def average(vector, weight, index):
        sent.append((vector[0].item(), weight))
        return RoundOutcome(True, group_size=2)

    d = DiLoCo(ps, DiLoCoConfig(local_steps=2), average, lambda: offers.pop())
    assert d.load_state(d.state_tensors(), 0)
    ps[0].sub_(6.0)  # six steps of progress came back with the model
    d.carry(6, 24)
    if swarm_ahead:
        d.mark_stale()  # what the strategies do after a restart from their own disk
    for _ in range(2):
        ps[0].sub_(1.0)
        d.after_local_step(4)
    assert sent == ([(2.0, 8.0)] if swarm_ahead else [(8.0, 32.0)])
    assert d.samples == d.steps_carried == 0


def test_a_peer_restored_from_a_donor_carries_nothing() -> None:
    ps = [torch.zeros(3)]
    d = DiLoCo(ps, DiLoCoConfig(local_steps=2), _unused)
    d.carry(6, 24)
    d.start_from_outer()
    assert d.samples == d.steps_carried == d.steps_overlapped == 0


def test_a_restart_from_its_own_checkpoint_carries_the_steps_since_its_last_round() -> None:
    from shoal.train.diloco_strategy import DiLoCoStrategy

    strategy = object.__new__(DiLoCoStrategy)
    strategy.lowrank = strategy.topk = None
    strategy.trainer = SimpleNamespace(step=30)
    strategy.opts = SimpleNamespace(batch_size=8)
    strategy.diloco = DiLoCo([torch.zeros(3)], DiLoCoConfig(local_steps=2), _unused)
    tensors = strategy.diloco.state_tensors()
    assert strategy.load_state(tensors, 4, applied_step=18)  # 12 steps since its last round
    d = strategy.diloco
    assert d.stale and (d.steps_carried, d.samples, d.round_index) == (12, 96, 4)
    assert strategy.load_state(tensors, 4, applied_step=30)  # none since
    assert (d.steps_carried, d.samples) == (0, 0)


def test_a_tie_s_state_is_not_rounds_on_top_of_this_peer_s_progress() -> None:
    """The other side of a tie applied as many rounds from other state: its state holds
    none of the rounds this peer's progress missed, so the progress still goes whole."""
    theirs = OuterNesterov([torch.full((3,), 5.0)])
    theirs.contributors = 4  # as many rounds applied (none), more contributors: we yield
    offer = ResyncState(0, {**theirs.state_tensors(), "outer.applied": torch.tensor(0)})
    failed = RoundOutcome(False, reason="no group")
    d, sent = _sent_after([failed, RoundOutcome(True, group_size=2)], resync=offer)
    assert torch.equal(d.outer.master[0], theirs.master[0])  # taken (the mean was zero)
    assert [w for _, w in sent] == [8.0, 16.0]
    assert [v[0].item() for v, _ in sent] == [2.0, 4.0]


def _failing_peer_and_donor(donor_round: int) -> tuple[DiLoCo, OuterNesterov, list[int]]:
    """A peer whose rounds all fail, and a donor one outer step ahead at ``donor_round``."""
    start = _peer_params(4)
    donor = OuterNesterov(start)
    donor.step(torch.full((11,), 0.02))
    calls: list[int] = []

    def average(vector, weight, index):
        calls.append(index)
        return RoundOutcome(False, reason="no group")

    ps = [t.clone() for t in start]
    d = DiLoCo(
        ps,
        DiLoCoConfig(local_steps=1),
        average,
        lambda: ResyncState(donor_round, donor.state_tensors()),
    )
    return d, donor, calls


def test_stale_peer_behind_the_swarm_skips_the_round_it_already_holds() -> None:
    d, donor, calls = _failing_peer_and_donor(5)
    assert not d.after_local_step(4).ok  # type: ignore[union-attr]
    assert calls == [0] and d.stale and d.round_index == 1
    report = d.after_local_step(4)  # the swarm is at round 5 already
    assert report is not None and report.resynced and not report.ok
    assert calls == [0] and d.round_index == 5 and not d.stale
    assert all(torch.equal(a, b) for a, b in zip(d.outer.master, donor.master, strict=True))


def test_a_resync_from_an_older_round_index_keeps_ours() -> None:
    # The donor's snapshot is from its last applied round; it (like us) has counted failed
    # rounds since. Taking the snapshot's index put us one round key behind for good.
    d, donor, calls = _failing_peer_and_donor(2)
    d.round_index = 7
    d.stale = True
    report = d.after_local_step(4)
    assert report is not None and report.resynced
    assert calls == [7] and d.round_index == 8  # it ran round 7, as the swarm does
    assert all(torch.equal(a, b) for a, b in zip(d.outer.master, donor.master, strict=True))


def test_a_resynced_peer_never_rewinds_to_the_snapshot_it_already_adopted(monkeypatch) -> None:
    """After adopting a donor's state, a later failed round asks only for state with more
    outer steps applied: re-adopting the same snapshot would put the round index back."""
    import shoal.train.diloco_strategy as ds

    donor = OuterNesterov(_peer_params(1))
    donor.step(torch.full((11,), 0.01))
    tensors = {**donor.state_tensors(), "outer.applied": torch.tensor(1)}
    asked: list[list[int]] = []

    def fetch(services, mode, *, ahead_of, tag_below):
        asked.append(ahead_of)
        return ResyncState(3, tensors, step=40) if ahead_of[0] < 1 else None

    monkeypatch.setattr(ds, "resync_from_swarm", fetch)
    strategy = object.__new__(ds.DiLoCoStrategy)
    strategy.services, strategy.lowrank, strategy.applied_step = None, None, 10
    strategy.stop = threading.Event()
    strategy.trainer = SimpleNamespace(step=12)

    def failing(vector, weight, index):
        return RoundOutcome(False, reason="no group")

    params = [t.clone() for t in _peer_params(1)]
    d = DiLoCo(params, DiLoCoConfig(local_steps=1), failing, strategy._resync, strategy._on_resync)
    strategy.diloco = d
    assert not d.after_local_step(4).ok  # type: ignore[union-attr]
    report = d.after_local_step(4)  # stale: adopts the donor's round 3
    assert report is not None and report.resynced and d.round_index == 3 and d.applied == 1
    assert strategy.applied_step == 12  # its own step, not the donor's 40
    assert not d.after_local_step(4).ok  # type: ignore[union-attr]  # round 3 fails
    report = d.after_local_step(4)  # nobody ahead of 1 applied round: round 4, no rewind
    assert report is not None and not report.resynced and report.round_index == 4
    assert asked == [[0], [1]] and d.round_index == 5


def test_a_donor_with_fewer_outer_steps_is_never_adopted_whatever_its_step() -> None:
    # A peer that trained alone first is hundreds of steps ahead; when it had missed a
    # round, a failed member that adopted its snapshot rolled back the round it applied.
    d, donor, _ = _failing_peer_and_donor(5)
    d.applied = 3
    own = [m.clone() for m in d.outer.master]
    behind = {**donor.state_tensors(), "outer.applied": torch.tensor(2)}
    refused: list[int] = []
    d.resync = lambda: ResyncState(5, behind, step=10_000, refuse=lambda: refused.append(1))
    d.mark_stale()
    report = d.after_local_step(4)
    assert report is not None and not report.resynced and d.applied == 3
    assert refused == [1]  # announced as ahead, it never will be: not asked for again
    assert all(torch.equal(a, b) for a, b in zip(d.outer.master, own, strict=True))
    # the count travels with snapshots
    again, _, _ = _failing_peer_and_donor(5)
    assert again.load_state(d.state_tensors(), 7) and again.applied == 3


@pytest.mark.parametrize(
    "spoil",
    [
        {"outer.master.0": torch.full((5,), float("nan"))},
        {"outer.momentum.1": torch.full((2, 3), float("inf"))},
        {"outer.master.0": torch.full((5,), 1e300, dtype=torch.float64)},  # inf in fp32
        {"outer.master.1": torch.zeros(3, 2)},
        {"outer.applied": torch.tensor(2.5)},
        {"outer.applied": torch.tensor(-1)},
    ],
)
def test_an_invalid_donor_state_is_refused_and_the_peer_goes_on(spoil) -> None:
    # Non-finite masters were adopted as they came, and one NaN spreads to every round.
    d, donor, calls = _failing_peer_and_donor(5)
    own, local = [m.clone() for m in d.outer.master], [p.clone() for p in d.params]
    bad = {**donor.state_tensors(), "outer.applied": torch.tensor(3), **spoil}
    refused: list[int] = []
    d.resync = lambda: ResyncState(5, bad, step=40, refuse=lambda: refused.append(1))
    d.mark_stale()
    report = d.after_local_step(4)  # refused: the round runs on the peer's own state
    assert report is not None and not report.resynced and calls == [0]
    assert refused == [1]  # its snapshot is passed over by the next ask
    assert d.applied == 0 and d.round_index == 1
    assert all(torch.equal(a, b) for a, b in zip(d.outer.master, own, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(d.params, local, strict=True))
    assert d.stale  # asked again at the next round, where a good donor is taken
    d.resync = lambda: ResyncState(
        5, donor.state_tensors(), step=40, refuse=lambda: refused.append(2)
    )
    report = d.after_local_step(4)
    assert report is not None and report.resynced and d.round_index == 5
    assert refused == [1]  # an adopted state is not refused
    assert not d.load_state(bad, 7) and d.round_index == 5  # a restore refuses it too


def test_a_peer_left_out_of_the_mean_takes_the_outer_step_and_keeps_its_progress() -> None:
    """A late or screened-out member gets the others' mean: it steps with them (same
    master everywhere) and carries its own local progress and samples to the next round."""
    start = _peer_params(3)
    others_mean = torch.full((11,), 0.02)

    def left_out(vector, weight, index):
        vector.copy_(others_mean)
        return RoundOutcome(
            True, group_size=3, reason="own contribution left out: late", included=False
        )

    ps = [t.clone() for t in start]
    d = DiLoCo(ps, DiLoCoConfig(local_steps=1, outer=OuterConfig(lr=1.0, momentum=0.0)), left_out)
    ps[0].add_(0.5)
    progress = [p - s for p, s in zip(ps, start, strict=True)]
    report = d.after_local_step(8)
    assert report is not None and report.ok and not d.stale
    expected_master = OuterNesterov(start, OuterConfig(lr=1.0, momentum=0.0))
    expected_master.step(others_mean)
    for m, e in zip(d.outer.master, expected_master.master, strict=True):
        assert torch.allclose(m, e)
    for p, m, lp in zip(ps, d.outer.master, progress, strict=True):
        assert torch.allclose(p, m + lp, atol=1e-6)  # local progress rebased, not dropped
    assert d.samples == 8  # counted again in the next round's weight
