"""Low-rank averaging of pseudo-gradients: exactness, agreement across peers, commit rule."""

from __future__ import annotations

import threading

import pytest
import torch

from shoal.errors import ConfigError
from shoal.train.diloco import DiLoCo, DiLoCoConfig, ResyncState
from shoal.train.diloco_lowrank import LowRankAverager
from shoal.train.outer import OuterConfig
from shoal.train.swarm_round_config import RoundOutcome

SHAPES = [torch.Size([32, 24]), torch.Size([24]), torch.Size([16, 2, 8])]


def _ok(vector: torch.Tensor, weight: float, index: int, stage: int) -> RoundOutcome:
    # the first exchange comes from matchmaking, which counted 3 live peers
    expected = 3 if stage == 0 else 0
    return RoundOutcome(
        True, contributors=frozenset({1, 2}), weight=weight, group_size=2, expected=expected
    )


def test_low_rank_inputs_come_through_exactly_and_dense_tensors_untouched() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 2, generator=g) @ torch.randn(2, 24, generator=g)
    b = torch.randn(24, generator=g)
    c = (torch.randn(16, 1, generator=g) @ torch.randn(1, 16, generator=g)).view(16, 2, 8)
    delta = torch.cat([a.reshape(-1), b, c.reshape(-1)])
    avg = LowRankAverager(SHAPES, rank=2)
    assert avg.matrices == [0, 2] and avg.dense == [1]
    assert avg.wire_numel() == 2 * (32 + 24) + 24 + 2 * (16 + 16)
    out = delta.clone()
    outcome = avg.average(out, 1.0, 0, _ok)
    assert outcome.ok and outcome.expected == 3  # a round short of the live peers shows
    assert torch.allclose(out, delta, atol=1e-4)
    assert all(e.abs().max() < 1e-4 for e in avg.error.values())


def test_error_feedback_keeps_what_was_not_sent() -> None:
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(sum(s.numel() for s in SHAPES), generator=g)
    avg = LowRankAverager(SHAPES, rank=1)
    out = delta.clone()
    assert avg.average(out, 1.0, 0, _ok).ok
    sent = out[: 32 * 24].view(32, 24)
    assert torch.allclose(sent + avg.error[0], delta[: 32 * 24].view(32, 24), atol=1e-5)
    assert torch.linalg.matrix_rank(sent) == 1


def test_failed_second_exchange_changes_nothing() -> None:
    avg = LowRankAverager(SHAPES, rank=2)
    q = {i: t.clone() for i, t in avg.q.items()}
    delta = torch.randn(sum(s.numel() for s in SHAPES))
    out = delta.clone()

    def second_fails(vector, weight, index, stage):
        if stage == 1:
            return RoundOutcome(False, reason="peer died")
        return _ok(vector, weight, index, stage)

    result = avg.average(out, 1.0, 0, second_fails)
    assert not result.ok and "second" in result.reason
    assert torch.equal(out, delta)
    assert all(torch.equal(avg.q[i], q[i]) for i in q)
    assert all(e.abs().max() == 0 for e in avg.error.values())


def test_left_out_of_the_second_exchange_is_reported_and_keeps_the_error_feedback() -> None:
    # Late or screened out of exchange 2: the mean holds no R of ours. It used to report
    # included=True (DiLoCo then dropped the local progress) and to set the error feedback
    # as if our R had been sent.
    avg = LowRankAverager(SHAPES, rank=2)
    delta = torch.randn(sum(s.numel() for s in SHAPES))

    def left_out_of_second(vector, weight, index, stage):
        if stage == 1:
            vector.mul_(0.5)  # stands for the others' mean
            return RoundOutcome(
                True,
                contributors=frozenset({2}),
                weight=1.0,
                group_size=2,
                included=False,
                reason="own contribution left out: late",
            )
        return _ok(vector, weight, index, stage)

    out = delta.clone()
    result = avg.average(out, 1.0, 0, left_out_of_second)
    assert result.ok and not result.included and "left out" in result.reason
    assert all(e.abs().max() == 0 for e in avg.error.values())  # nothing kept twice
    assert not torch.equal(out, delta)  # the others' mean, for the outer step all take


def test_peers_end_with_the_same_result_the_projected_weighted_mean() -> None:
    n = 3
    weights = [1.0, 2.0, 5.0]
    g = torch.Generator().manual_seed(2)
    deltas = [torch.randn(sum(s.numel() for s in SHAPES), generator=g) for _ in range(n)]
    outs = [d.clone() for d in deltas]
    peers = [LowRankAverager(SHAPES, rank=3, seed=7) for _ in range(n)]
    barrier = threading.Barrier(n, timeout=30)
    slots: dict[tuple[int, int], torch.Tensor] = {}

    def raw(rank: int):
        def average(vector, weight, index, stage):
            slots[(stage, rank)] = vector.clone()
            barrier.wait()
            total = sum(weights)
            vector.copy_(sum(slots[(stage, r)] * weights[r] for r in range(n)) / total)
            barrier.wait()
            return RoundOutcome(True, contributors=frozenset(range(n)), weight=total, group_size=n)

        return average

    threads = [
        threading.Thread(target=peers[r].average, args=(outs[r], weights[r], 0, raw(r)))
        for r in range(n)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    mean = sum(d * w for d, w in zip(deltas, weights, strict=True)) / sum(weights)
    # Dense tensors: exact weighted mean; matrices: the mean projected on a shared basis.
    assert torch.allclose(outs[0][768:792], mean[768:792], atol=1e-6)
    sent = outs[0][:768].view(32, 24)
    p, _ = torch.linalg.qr(sent)
    assert torch.allclose(p[:, :3] @ p[:, :3].T @ mean[:768].view(32, 24), sent, atol=1e-4)
    assert all(torch.equal(peers[0].q[i], peers[1].q[i]) for i in peers[0].q)


def test_a_rank_that_compresses_no_matrix_is_refused_with_the_limit() -> None:
    with pytest.raises(ConfigError, match=r"rank 16 compresses none.*at most rank 15"):
        LowRankAverager([torch.Size([64, 64]), torch.Size([64])], 16)
    assert LowRankAverager([torch.Size([64, 64])], 15).matrices == [0]
    with pytest.raises(ConfigError, match="it has none to compress"):
        LowRankAverager([torch.Size([4, 4]), torch.Size([8])], 1)


def test_error_feedback_from_a_checkpoint_must_fit_every_matrix() -> None:
    avg = LowRankAverager(SHAPES, rank=2)
    saved = {k: torch.randn_like(v) for k, v in avg.local_state().items()}
    assert sorted(saved) == ["local.lowrank.error.0", "local.lowrank.error.2"]
    again = LowRankAverager(SHAPES, rank=2)
    for wrong in (
        {"local.lowrank.error.0": saved["local.lowrank.error.0"]},  # one missing
        {**saved, "local.lowrank.error.0": torch.zeros(3, 3)},  # misshapen
        {k: v.to(torch.int32) for k, v in saved.items()},  # not floating point
    ):
        assert not again.load_local_state(wrong)
        assert all(e.abs().max() == 0 for e in again.error.values())  # nothing changed
    assert again.load_local_state(saved)
    assert all(torch.equal(again.error[i], saved[f"local.lowrank.error.{i}"]) for i in (0, 2))


class _Swarm:
    """Peers that average in lockstep, one thread each. ``left_out[(round, stage)]`` names
    the peers a mean leaves out (they get the others' mean); a stage-1 exchange runs among
    the round's stage-0 contributors only, as ``SwarmRounds.again`` does."""

    def __init__(self, n: int, left_out: dict[tuple[int, int], set[int]]) -> None:
        self.n = n
        self.left_out = left_out
        self.slots: dict[tuple[int, int, int], tuple[torch.Tensor, float]] = {}
        self.barriers: dict[tuple[int, int], threading.Barrier] = {}
        self.lock = threading.Lock()

    def members(self, index: int, stage: int) -> list[int]:
        peers = range(self.n) if stage == 0 else self.contributors(index, 0)
        return list(peers)

    def contributors(self, index: int, stage: int) -> list[int]:
        out = self.left_out.get((index, stage), set())
        return [p for p in self.members(index, stage) if p not in out]

    def barrier(self, index: int, stage: int) -> threading.Barrier:
        with self.lock:
            key = (index, stage)
            if key not in self.barriers:
                self.barriers[key] = threading.Barrier(len(self.members(*key)), timeout=30)
            return self.barriers[key]

    def raw(self, peer: int):
        def average(vector, weight, index, stage):
            self.slots[(index, stage, peer)] = (vector.clone(), weight)
            self.barrier(index, stage).wait()  # every member's vector is in
            contributors = self.contributors(index, stage)
            total = sum(self.slots[(index, stage, p)][1] for p in contributors)
            vector.copy_(
                sum(
                    self.slots[(index, stage, p)][0] * self.slots[(index, stage, p)][1]
                    for p in contributors
                )
                / total
            )
            return RoundOutcome(
                True,
                contributors=frozenset(contributors),
                weight=total,
                group_size=len(self.members(index, stage)),
                included=peer in contributors,
                seconds={"allreduce": 1.0},
                expected=self.n if stage == 0 else 0,
            )

        return average


PEER_SHAPES = [torch.Size([32, 24]), torch.Size([24])]
"""A matrix that travels as factors and a bias that travels dense."""


def _lowrank_peers(swarm: _Swarm) -> list[tuple[DiLoCo, LowRankAverager]]:
    peers = []
    for r in range(swarm.n):
        low = LowRankAverager(PEER_SHAPES, 2, seed=0)
        raw = swarm.raw(r)
        config = DiLoCoConfig(local_steps=1, outer=OuterConfig(lr=1.0, momentum=0.0))
        d = DiLoCo(
            [torch.zeros(s) for s in PEER_SHAPES],
            config,
            lambda v, w, i, low=low, raw=raw: low.average(v, w, i, raw),
        )
        peers.append((d, low))
    return peers


def _round(peers: list[tuple[DiLoCo, LowRankAverager]], bias_moves: list[float]) -> list:
    """Every peer moves its bias by its ``bias_moves`` (one local step), then they average."""
    reports: list = [None] * len(peers)

    def go(r: int) -> None:
        peers[r][0].params[1].add_(bias_moves[r])
        reports[r] = peers[r][0].after_local_step(1)

    threads = [threading.Thread(target=go, args=(r,)) for r in range(len(peers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(r is not None for r in reports)
    return reports


def test_a_peer_left_out_of_the_second_exchange_sends_its_dense_progress_once() -> None:
    # A moved its bias by +1, B by +3; B is in the first exchange's mean but not in the
    # second's. The bias used to be averaged in the first exchange (B's +3 in it) while B
    # kept all its progress and sent the +3 again next round: 2.0 after round 1, then 4.0
    # with no further training. Every value applied is now a mean over the reported set.
    swarm = _Swarm(2, {(0, 1): {1}})
    peers = _lowrank_peers(swarm)
    (a, _), (b, _) = peers
    first = _round(peers, [1.0, 3.0])
    assert all(r.ok and r.contributors == 1 for r in first)  # B's report says it is not in
    assert torch.equal(a.outer.master[1], b.outer.master[1])
    assert torch.allclose(a.outer.master[1], torch.full((24,), 1.0))  # A's +1 alone
    assert torch.allclose(b.params[1] - b.outer.master[1], torch.full((24,), 3.0))  # kept
    assert b.samples == 1
    second = _round(peers, [0.0, 0.0])
    assert all(r.ok and r.contributors == 2 for r in second)
    # B's +3 now goes in once, weighted by the two rounds of samples it stands for (the
    # one step the swarm stepped past without it is one round's worth: none scaled away).
    assert torch.allclose(a.outer.master[1], torch.full((24,), 1.0 + (1 * 0.0 + 2 * 3.0) / 3))
    assert torch.equal(a.outer.master[1], b.outer.master[1])


def test_a_peer_left_out_of_the_first_exchange_takes_the_swarm_step_at_its_next_round() -> None:
    # C is late for the first exchange: the second runs among A and B only, so no R-bar comes
    # to C and it cannot take their outer step in this round. It keeps its progress, error
    # feedback and samples, reports the round's time, and takes A's outer state (Q too)
    # before its next round: it ends where a plain DiLoCo round that left it out ends.
    swarm = _Swarm(3, {(0, 0): {2}})
    peers = _lowrank_peers(swarm)
    (a, a_low), (b, _), (c, c_low) = peers
    c.resync = lambda: ResyncState(a.round_index, {**a.state_tensors(), **a_low.state_tensors()})
    c.on_resync = lambda state: c_low.load_state_tensors(state.tensors)
    first = _round(peers, [1.0, 2.0, 6.0])
    assert first[0].ok and first[1].ok and not first[2].ok and c.stale
    assert first[2].seconds == {"allreduce": 1.0}  # the first exchange took this peer's time
    assert "first" in first[2].reason
    assert torch.allclose(a.outer.master[1], torch.full((24,), 1.5))
    assert torch.allclose(c.params[1] - c.outer.master[1], torch.full((24,), 6.0))
    assert c.samples == 1 and all(e.abs().max() == 0 for e in c_low.error.values())
    second = _round(peers, [0.0, 0.0, 0.0])
    assert second[2].resynced and all(r.ok and r.contributors == 3 for r in second)
    # C's +6 goes in once: its 2 steps, adopted over, count as one round (H = 1), so +3
    # with one round's samples: 1.5 + 3 / 3.
    assert torch.allclose(a.outer.master[1], torch.full((24,), 2.5))
    assert a.outer.fingerprint() == b.outer.fingerprint() == c.outer.fingerprint()
    assert all(torch.equal(a_low.q[i], c_low.q[i]) for i in a_low.q)
