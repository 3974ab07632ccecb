"""Pure routing and rebalancing decisions, with fake clocks and seeded RNGs."""

from __future__ import annotations

import collections
import random

import pytest

from shoal.errors import ConfigError
from shoal.parallel.pipeline.config import StageServerConfig, TrainerConfig
from shoal.parallel.pipeline.meter import ThroughputMeter
from shoal.parallel.pipeline.rebalance import choose_move, initial_stage, stage_totals
from shoal.parallel.pipeline.routing import (
    Candidate,
    ServerStats,
    choose_server,
    expected_time_s,
)


def cand(peer: int, throughput: float = 10.0, queue: int = 0) -> Candidate:
    return Candidate(bytes([peer]) * 32, f"127.0.0.1:{1000 + peer}", throughput, queue)


def picks(
    cands: list[Candidate], stats: dict[bytes, ServerStats], n: int = 4000, now: float = 0.0
) -> collections.Counter[int]:
    rng = random.Random(7)
    out: collections.Counter[int] = collections.Counter()
    for _ in range(n):
        c = choose_server(cands, stats, rng, now)
        out[c.peer[0] if c else -1] += 1
    return out


def test_weighted_by_throughput() -> None:
    counts = picks([cand(1, 100.0), cand(2, 10.0)], {})
    # weights 1 / (latency prior + 1 / throughput): 1 / 0.06 and 1 / 0.15
    expected = expected_time_s(cand(2, 10.0), None) / expected_time_s(cand(1, 100.0), None)
    assert expected == pytest.approx(2.5)
    assert counts[1] / counts[2] == pytest.approx(expected, rel=0.15)


def test_queue_and_inflight_lower_the_weight() -> None:
    counts = picks([cand(1, 10.0, queue=20), cand(2, 10.0)], {})
    assert counts[2] > 5 * counts[1] > 0
    stats = {cand(2).peer: ServerStats(inflight=20)}
    counts = picks([cand(1, 10.0), cand(2, 10.0)], stats)
    assert counts[1] > 5 * counts[2] > 0


def test_latency_aware() -> None:
    far = {cand(2).peer: ServerStats(latency_s=1.0), cand(1).peer: ServerStats(latency_s=0.01)}
    counts = picks([cand(1, 50.0), cand(2, 50.0)], far)
    assert counts[1] > 5 * counts[2] > 0


def test_banned_skipped_until_ban_ends_and_bans_double() -> None:
    stats = {cand(1).peer: ServerStats()}
    end = stats[cand(1).peer].ban(now=100.0, base_s=5.0)
    assert end == 105.0
    assert picks([cand(1), cand(2)], stats, n=200, now=104.0)[1] == 0
    assert picks([cand(1), cand(2)], stats, n=200, now=105.5)[1] > 0
    assert stats[cand(1).peer].ban(now=200.0, base_s=5.0) == 210.0


def test_busy_used_only_when_nothing_else() -> None:
    stats = {cand(1).peer: ServerStats(busy_until=10.0)}
    assert picks([cand(1), cand(2)], stats, n=300, now=5.0)[1] == 0
    assert picks([cand(1)], stats, n=10, now=5.0)[1] == 10


def test_none_when_all_banned_or_excluded() -> None:
    stats = {cand(1).peer: ServerStats(banned_until=50.0)}
    assert choose_server([cand(1)], stats, random.Random(0), 10.0) is None
    assert choose_server([cand(2)], {}, random.Random(0), 0.0, frozenset({cand(2).peer})) is None
    assert choose_server([], {}, random.Random(0), 0.0) is None


def test_meter_is_capacity_over_window() -> None:
    m = ThroughputMeter(window_s=10.0, default=3.0)
    assert m.throughput(0.0) == 3.0
    m.record(8, 0.5, now=1.0)
    m.record(8, 0.5, now=2.0)
    assert m.throughput(2.0) == pytest.approx(16.0)
    assert m.throughput(11.5) == pytest.approx(16.0)  # the first fell out, same rate
    assert m.throughput(30.0) == 3.0


def test_initial_stage_fills_holes_then_least_throughput() -> None:
    assert initial_stage([1, 0, 2], [5.0, 0.0, 9.0]) == 1
    assert initial_stage([1, 1, 2], [5.0, 3.0, 9.0]) == 1
    assert stage_totals(3, [(0, 1.0), (0, 2.0), (2, 4.0), (7, 9.0)]) == [3.0, 0.0, 4.0]


def move(
    current: int,
    rank: int,
    mine: float,
    counts: list[int],
    totals: list[float],
    since: float = 100.0,
) -> int | None:
    return choose_move(
        current, rank, mine, counts, totals, hysteresis=0.2, since_move_s=since, min_dwell_s=10.0
    )


def test_moves_fill_an_empty_stage_one_server_only() -> None:
    counts, totals = [2, 1, 1, 0], [20.0, 10.0, 10.0, 0.0]
    assert move(0, 0, 10.0, counts, totals) == 3
    assert move(0, 1, 10.0, counts, totals) is None
    assert move(1, 0, 10.0, counts, totals) is None  # alone on its stage: never leaves it
    assert move(0, 0, 10.0, counts, totals, since=1.0) is None  # dwell time


def test_throughput_move_with_hysteresis_does_not_flap() -> None:
    # stage 0 has three servers (30/s), stage 1 one slow one (5/s): moving one helps a lot.
    assert move(0, 0, 10.0, [3, 1], [30.0, 5.0]) == 1
    assert move(0, 1, 10.0, [3, 1], [30.0, 5.0]) is None  # only rank 0 moves
    # after the move: 20/s vs 15/s. Moving back would give min(5, 30) = 5 < 15: stays.
    assert move(1, 0, 10.0, [2, 2], [20.0, 15.0]) is None
    assert move(0, 0, 10.0, [2, 2], [20.0, 15.0]) is None  # 10 < 15 * 1.2: not worth it
    # a small gain below the hysteresis is not taken
    assert move(0, 0, 1.0, [2, 1], [10.0, 8.5]) is None


def test_configs_name_bad_fields() -> None:
    with pytest.raises(ConfigError, match="max_queue"):
        StageServerConfig(max_queue=0)
    with pytest.raises(ConfigError, match="codec"):
        TrainerConfig(codec="zip")
    with pytest.raises(ConfigError, match="announce_ttl_s"):
        StageServerConfig(announce_period_s=5.0, announce_ttl_s=5.0)
