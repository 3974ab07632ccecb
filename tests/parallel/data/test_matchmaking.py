"""Window estimation, group formation and the rendezvous loop, all on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from shoal.errors import ConfigError
from shoal.parallel.data.matchmaking import (
    FormationConfig,
    FormationEstimator,
    ReadyPeer,
    form_groups,
    window_closed,
)
from shoal.parallel.data.rendezvous import MatchConfig, MemoryBoard, find_group


def test_window_follows_history_within_floor_and_cap():
    est = FormationEstimator(FormationConfig(initial_s=5.0, floor_s=0.5, cap_s=30.0))
    assert est.window_s() == 5.0
    for _ in range(50):
        est.observe(2.0)
    assert est.window_s() == pytest.approx(2.0, abs=0.05)  # deviation decays
    for _ in range(50):
        est.observe(0.01)
    assert est.window_s() == 0.5
    for _ in range(50):
        est.observe(100.0)
    assert est.window_s() == 30.0
    jittery = FormationEstimator(FormationConfig(cap_s=60.0))
    for i in range(50):
        jittery.observe(1.0 if i % 2 else 3.0)
    assert jittery.window_s() > 3.0  # variable history earns margin


def test_window_closes_when_full_or_expired():
    assert window_closed(now=1.0, opened_at=0.0, window_s=5.0, n_ready=4, expected_peers=4)
    assert not window_closed(now=1.0, opened_at=0.0, window_s=5.0, n_ready=3, expected_peers=4)
    assert window_closed(now=5.0, opened_at=0.0, window_s=5.0, n_ready=1, expected_peers=4)
    with pytest.raises(ConfigError, match="initial_s"):
        FormationConfig(initial_s=100.0, cap_s=60.0)


def _peers(n: int, clients: int = 0) -> list[ReadyPeer]:
    return [ReadyPeer(bytes([i]) * 32, 1.0, 1e8, client_mode=i < clients) for i in range(n)]


def test_groups_are_bounded_balanced_and_identical_for_every_view_order():
    peers = _peers(10, clients=3)
    groups = form_groups(b"round-1", peers, max_group_size=4)
    again = form_groups(b"round-1", list(reversed(peers)), max_group_size=4)
    assert groups == again
    sizes = sorted(len(g.members) for g in groups)
    assert sizes == [3, 3, 4]
    assert all(any(not p.client_mode for p in g.members) for g in groups)
    assert sorted(p.peer for g in groups for p in g.members) == sorted(p.peer for p in peers)
    assert len({g.group_id for g in groups}) == 3
    assert form_groups(b"round-2", peers, max_group_size=4) != groups


def test_lonely_peer_and_client_only_groups_skip_the_round():
    assert form_groups(b"r", _peers(1), max_group_size=4) == []
    assert form_groups(b"r", _peers(3, clients=3), max_group_size=4) == []


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


def test_find_group_closes_early_when_everyone_is_ready_and_learns_the_time():
    clock = FakeClock()
    board = MemoryBoard(clock)
    est = FormationEstimator(FormationConfig(initial_s=5.0))
    peers = _peers(4)

    async def main():
        for p in peers[1:]:
            await board.announce(b"k", p, expires_at=100.0)
        return await find_group(
            board,
            b"k",
            peers[0],
            expected_peers=4,
            estimator=est,
            config=MatchConfig(max_group_size=8),
            clock=clock,
            sleep=clock.sleep,
        )

    group = asyncio.run(main())
    assert group is not None and len(group.members) == 4
    assert clock.now == 0.0 and est.mean_s == 0.0


def test_find_group_waits_the_window_then_goes_with_who_came():
    clock = FakeClock()
    board = MemoryBoard(clock)
    est = FormationEstimator(FormationConfig(initial_s=2.0))
    peers = _peers(4)

    async def main():
        await board.announce(b"k", peers[1], expires_at=100.0)
        return await find_group(
            board,
            b"k",
            peers[0],
            expected_peers=4,
            estimator=est,
            config=MatchConfig(poll_interval_s=0.25),
            clock=clock,
            sleep=clock.sleep,
        )

    group = asyncio.run(main())
    assert group is not None and {p.peer for p in group.members} == {peers[0].peer, peers[1].peer}
    assert clock.now == pytest.approx(2.0)
    assert est.mean_s == pytest.approx(2.0)
