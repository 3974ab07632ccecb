"""``SwarmRounds`` over real runtimes and a DHT on loopback: shares, client mode, uplink."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from shoal.dht.peer import DHT
from shoal.errors import ConfigError
from shoal.net import Identity, NetConfig, NetRuntime
from shoal.net.shaper import LinkShaper, ShaperConfig
from shoal.parallel.data.matchmaking import ReadyPeer, form_groups
from shoal.train.swarm_round import SwarmRounds
from shoal.train.swarm_round_config import RoundsConfig, announced_bandwidth, retry_key

NUMEL = 1_000_000


@contextlib.contextmanager
def _swarm(n: int) -> Iterator[tuple[list[NetRuntime], list[DHT]]]:
    """``n`` runtimes with a DHT each, all joined through the first; closed afterwards."""
    runtimes = [NetRuntime(Identity.generate(), NetConfig(port=0)).start() for _ in range(n)]
    dhts = [DHT(rt) for rt in runtimes]
    try:
        for dht in dhts[1:]:
            dht.bootstrap([runtimes[0].address])
        yield runtimes, dhts
    finally:
        for dht in dhts:
            dht.close()
        for rt in runtimes:
            rt.close()


def _everyone_averages(runtimes, rounds, vectors, key: bytes) -> list:
    """One round of every peer at once, each from its own thread; their outcomes."""

    def one(i: int):
        coro = rounds[i].average(vectors[i], 1.0, round_key=key, expected_peers=len(rounds))
        return runtimes[i].run(coro, timeout_s=60.0)

    with ThreadPoolExecutor(len(rounds)) as pool:
        return list(pool.map(one, range(len(rounds))))


def test_a_client_mode_peer_contributes_without_reducing_and_uplinks_are_measured():
    with _swarm(3) as (runtimes, dhts):
        rounds = [
            SwarmRounds(
                rt,
                dht.node,
                swarm="t",
                config=RoundsConfig(wire_codec="none", window_initial_s=20.0, client_mode=(i == 2)),
            )
            for i, (rt, dht) in enumerate(zip(runtimes, dhts, strict=True))
        ]
        g = torch.Generator().manual_seed(0)
        inputs = [torch.randn(NUMEL, generator=g) for _ in range(3)]
        vectors = [x.clone() for x in inputs]
        weights = [1.0, 2.0, 3.0]

        def run_round(key: bytes) -> list:
            def one(i: int):
                coro = rounds[i].average(vectors[i], weights[i], round_key=key, expected_peers=3)
                return runtimes[i].run(coro, timeout_s=60.0)

            with ThreadPoolExecutor(3) as pool:
                return list(pool.map(one, range(3)))

        outcomes = run_round(b"r0")

        ids = {rt.peer_id for rt in runtimes}
        for outcome in outcomes:
            assert outcome.ok, outcome.reason
            assert outcome.contributors == ids and outcome.weight == sum(weights)
        expect = sum(w * x.double() for w, x in zip(weights, inputs, strict=True)) / sum(weights)
        for v in vectors:
            assert torch.allclose(v.double(), expect, atol=1e-5, rtol=0)
        # every member derived the same split: the client reduces nothing
        for r in rounds:
            spec = r.last_group
            assert spec is not None
            client = dict(zip(spec.members, spec.client_mode, strict=True))
            assert client == {rt.peer_id: i == 2 for i, rt in enumerate(runtimes)}
        sent = [
            rt.traffic.snapshot()["services"]["shoal.v1.Averaging"]["bytes_out"] for rt in runtimes
        ]
        # the client sends its two parts (4 MB); a reducer also sends its result twice
        assert sent[2] < 0.8 * min(sent[:2])
        # round 0 splits by the prior (downlinks not measured: 0); then each peer announces
        # the links it measured (the client its downlink from the results it pulled)
        for r in rounds:
            assert set(r.last_group.uplinks_bps) == {announced_bandwidth(1e8)}
            assert set(r.last_group.downlinks_bps) == {0.0}
        measured = [r.uplink_bps for r in rounds]
        assert all(m is not None and m > 0 for m in measured)
        measured_down = [r.downlink_bps for r in rounds]
        assert all(m is not None and m > 0 for m in measured_down)
        assert all(o.ok for o in run_round(b"r1"))
        announced = {
            rt.peer_id: (announced_bandwidth(up), announced_bandwidth(down) if down else 0.0)
            for rt, up, down in zip(runtimes, measured, measured_down, strict=True)
        }
        for r in rounds:
            spec = r.last_group
            links = zip(spec.uplinks_bps, spec.downlinks_bps, strict=True)
            assert dict(zip(spec.members, links, strict=True)) == announced


def test_announced_bandwidth_sits_on_a_half_octave_grid():
    assert announced_bandwidth(1e8) == announced_bandwidth(1.05e8)
    assert announced_bandwidth(2e8) > announced_bandwidth(1e8)
    assert announced_bandwidth(1e8) / announced_bandwidth(1e8 / 1.5) in (1.0, 2**0.5)
    assert announced_bandwidth(0.0) == 1.0


@pytest.mark.slow
def test_a_peer_behind_a_slow_uplink_is_given_a_smaller_share():
    # Peer 2 reaches the others only through 20 Mbit/s shapers (its uplink); after one round
    # it measures that, announces it, and every member gives it a smaller part to reduce.
    runtimes = [NetRuntime(Identity.generate(), NetConfig(port=0)).start() for _ in range(3)]
    dhts = [DHT(rt) for rt in runtimes]
    slow = runtimes[2]
    shapers: list[LinkShaper] = []
    try:
        for dht in dhts[1:]:
            dht.bootstrap([runtimes[0].address])
        for rt in runtimes[:2]:
            host, port = rt.address.rsplit(":", 1)
            cfg = ShaperConfig(target_host=host, target_port=int(port), up_rate_bit_s=20e6)
            shaper = LinkShaper(cfg)
            slow.run(shaper.start(), timeout_s=10.0)
            shapers.append(shaper)
        rounds = [
            SwarmRounds(rt, dht.node, swarm="t", config=RoundsConfig(wire_codec="none"))
            for rt, dht in zip(runtimes, dhts, strict=True)
        ]
        through = {
            rt.peer_id: "{}:{}".format(*s.address)
            for rt, s in zip(runtimes[:2], shapers, strict=True)
        }
        slow_transport = rounds[2].transport
        join = slow_transport.join

        def join_through_shapers(group):  # the slow peer dials the others via its uplink
            spec = join(group)
            for peer, address in through.items():
                slow_transport.set_address(peer, address)
            return spec

        slow_transport.join = join_through_shapers
        vectors = [torch.randn(NUMEL) for _ in range(3)]

        def run_round(key: bytes) -> list:
            def one(i: int):
                coro = rounds[i].average(vectors[i], 1.0, round_key=key, expected_peers=3)
                return runtimes[i].run(coro, timeout_s=60.0)

            with ThreadPoolExecutor(3) as pool:
                return list(pool.map(one, range(3)))

        assert all(o.ok for o in run_round(b"r0"))
        assert rounds[2].uplink_bps < 0.5 * min(r.uplink_bps for r in rounds[:2])
        assert all(o.ok for o in run_round(b"r1"))
        for r in rounds:
            spec = r.last_group
            by_peer = dict(zip(spec.members, spec.shares(), strict=True))
            assert by_peer[slow.peer_id] < 0.25  # an equal split would be 1/3
        assert shapers[0].up.bytes > 0  # its traffic did cross the shaped links
    finally:
        for s in shapers:
            slow.run(s.close(), timeout_s=10.0)
        for dht in dhts:
            dht.close()
        for rt in runtimes:
            rt.close()


def test_a_round_retried_under_the_same_key_after_a_failed_all_reduce_succeeds():
    """Sync mode asks again for a step whose round failed, with the same key. The retry
    meets under a key derived from the failed group: under the old key the same members
    would form the same round id, which their inboxes remember as over."""
    with _swarm(2) as (runtimes, dhts):
        config = RoundsConfig(wire_codec="none", window_initial_s=20.0, allreduce_timeout_s=3.0)
        rounds = [
            SwarmRounds(rt, dht.node, swarm="t", config=config)
            for rt, dht in zip(runtimes, dhts, strict=True)
        ]

        def attempt(sizes: list[int], late_s: float = 0.0) -> list:
            vectors = [torch.full((n,), float(i)) for i, n in enumerate(sizes)]

            def one(i: int):
                if i == 1:  # the second peer comes back later, as after a longer step
                    time.sleep(late_s)
                coro = rounds[i].average(vectors[i], 1.0, round_key=b"sync/7", expected_peers=2)
                return runtimes[i].run(coro, timeout_s=60.0)

            with ThreadPoolExecutor(2) as pool:
                outcomes = list(pool.map(one, range(2)))
            return [(o, v) for o, v in zip(outcomes, vectors, strict=True)]

        # The peers disagree on the vector's length: every part is the wrong size somewhere.
        assert all(not o.ok for o, _ in attempt([1000, 999]))
        # Under the old key, the first peer back would meet the second's stale entry and
        # send into a round the second still holds as over.
        for outcome, vector in attempt([1000, 1000], late_s=1.0):
            assert outcome.ok, outcome.reason
            assert torch.equal(vector, torch.full((1000,), 0.5))


def test_retry_keys_are_shared_by_the_failed_group_and_stay_short():
    key = b"sync/7/abc"
    first = retry_key(key, b"g1")
    assert first == retry_key(key, b"g1") and first != retry_key(key, b"g2")
    assert first.startswith(key + b"/after-")
    again = retry_key(first, b"g3")
    assert again != first and len(again) == len(first)


def test_a_peer_screened_out_of_the_mean_is_told_so():
    """A member whose contribution the reducers reject still gets the others' mean, with
    ``included`` False and the reducers' reason, so DiLoCo keeps its local progress."""
    with _swarm(3) as (runtimes, dhts):
        config = RoundsConfig(wire_codec="none", window_initial_s=20.0)
        rounds = [
            SwarmRounds(rt, dht.node, swarm="t", config=config)
            for rt, dht in zip(runtimes, dhts, strict=True)
        ]
        vectors = [torch.full((1000,), 1.0), torch.full((1000,), 3.0), torch.full((1000,), 1.0)]
        vectors[2][7] = float("nan")
        outcomes = _everyone_averages(runtimes, rounds, vectors, b"screen")
        for outcome, v in zip(outcomes, vectors, strict=True):
            assert outcome.ok and len(outcome.contributors) == 2
            assert torch.equal(v, torch.full((1000,), 2.0))
        assert [o.included for o in outcomes] == [True, True, False]
        assert "not finite" in outcomes[2].reason


def test_a_peer_whose_contributions_are_refused_twice_is_banned_by_those_who_refused_them():
    with _swarm(3) as (runtimes, dhts):
        config = RoundsConfig(wire_codec="none", window_initial_s=20.0, allreduce_timeout_s=6.0)
        rounds = [
            SwarmRounds(rt, dht.node, swarm="t", config=config)
            for rt, dht in zip(runtimes, dhts, strict=True)
        ]
        garbage = runtimes[2].peer_id
        banned = []
        for key in (b"nan-1", b"nan-2"):
            vectors = [torch.full((1000,), v) for v in (1.0, 1.0, float("nan"))]
            outcomes = _everyone_averages(runtimes, rounds, vectors, key)
            assert [o.ok for o in outcomes] == [True, True, True]
            assert [o.included for o in outcomes] == [True, True, False]
            banned.append([rt.is_banned(garbage) for rt in runtimes[:2]])
        assert banned == [[False, False], [True, True]]  # once may be an accident
        assert not runtimes[2].is_banned(runtimes[0].peer_id)
        # While banned it is not trusted with a part, even with a sound vector: no one who
        # banned it sends it anything, so its part is cut off and the others go on.
        vectors = [torch.full((1000,), v) for v in (1.0, 3.0, 5.0)]
        outcomes = _everyone_averages(runtimes, rounds, vectors, b"after")
        assert [o.ok for o in outcomes] == [True, True, False]
        assert outcomes[0].contributors == {runtimes[0].peer_id, runtimes[1].peer_id}
        assert torch.equal(vectors[0], torch.full((1000,), 2.0))


def test_a_swarm_set_to_a_robust_rule_outvotes_a_peer_that_screening_lets_through():
    # 500 is within screening's 1000 x median: the mean would be 168, the trimmed mean of
    # three is the median, 3.
    with _swarm(3) as (runtimes, dhts):
        config = RoundsConfig(wire_codec="none", window_initial_s=20.0, aggregation="trimmed_mean")
        rounds = [
            SwarmRounds(rt, dht.node, swarm="t", config=config)
            for rt, dht in zip(runtimes, dhts, strict=True)
        ]
        vectors = [torch.full((1000,), v) for v in (1.0, 3.0, 500.0)]
        outcomes = _everyone_averages(runtimes, rounds, vectors, b"robust")
        for outcome, v in zip(outcomes, vectors, strict=True):
            assert outcome.ok and len(outcome.contributors) == 3
            assert torch.equal(v, torch.full((1000,), 3.0))
    with pytest.raises(ConfigError, match="aggregation must be one of"):
        RoundsConfig(aggregation="median")


@pytest.mark.parametrize("another_never_confirms", [False, True])
def test_a_peer_stopped_right_after_confirming_its_group_is_not_waited_for(
    another_never_confirms: bool,
):
    # The others start the all-reduce as soon as they read its confirmation; it was
    # stopped before its all-reduce began, so only the leave it sends on the way out keeps
    # them from waiting out the collect deadline (0.55 x 30 s). When another member never
    # confirmed, the others went on as a smaller group under another id, and that leave
    # named the group it had confirmed: they waited (the all-reduce took 19.5 s).
    n = 4 if another_never_confirms else 3
    with _swarm(n) as (runtimes, dhts):
        rounds = [
            SwarmRounds(
                rt,
                dht.node,
                swarm="t",
                config=RoundsConfig(wire_codec="none", window_initial_s=20.0),
            )
            for rt, dht in zip(runtimes, dhts, strict=True)
        ]
        real_confirm = rounds[2].board.confirm

        async def confirm_then_stop(*args, **kwargs):
            await real_confirm(*args, **kwargs)
            raise asyncio.CancelledError  # SIGTERM lands right after the confirmation

        async def stop_before_confirming(*args, **kwargs):
            raise asyncio.CancelledError

        rounds[2].board.confirm = confirm_then_stop  # type: ignore[method-assign]
        if another_never_confirms:
            rounds[3].board.confirm = stop_before_confirming  # type: ignore[method-assign]
        vectors = [torch.full((NUMEL,), float(i)) for i in range(n)]

        def one(i: int):
            coro = rounds[i].average(vectors[i], 1.0, round_key=b"r-stop", expected_peers=n)
            try:
                return runtimes[i].run(coro, timeout_s=60.0)
            except (asyncio.CancelledError, concurrent.futures.CancelledError):
                return None

        start = time.monotonic()
        with ThreadPoolExecutor(n) as pool:
            outcomes = list(pool.map(one, range(n)))
        took = time.monotonic() - start
        assert all(outcome is None for outcome in outcomes[2:])
        both = {runtimes[0].peer_id, runtimes[1].peer_id}
        for outcome in outcomes[:2]:
            assert outcome.ok and outcome.contributors == both, outcome.reason
            assert outcome.seconds["allreduce"] < 8.0, outcome.seconds
        assert torch.allclose(vectors[0], torch.full((NUMEL,), 0.5))
        assert took < 40.0


def test_the_window_is_at_least_a_share_of_the_round_period():
    # Peers that used to arrive together shrink the learned window to its floor; under
    # load a late peer then misses the round and loses its local work. The window is at
    # least a quarter of the time between this peer's rounds (here nobody comes, so the
    # round shows how long the window stayed open).
    with _swarm(1) as (runtimes, dhts):
        cfg = RoundsConfig(wire_codec="none", window_initial_s=0.5, window_floor_s=0.5)
        rounds = SwarmRounds(runtimes[0], dhts[0].node, swarm="t", config=cfg)
        vector = torch.zeros(8)

        def window_of(key: bytes) -> float:
            outcome = runtimes[0].run(
                rounds.average(vector, 1.0, round_key=key, expected_peers=2), timeout_s=30.0
            )
            assert not outcome.ok
            return outcome.seconds["matchmaking"]

        def forget_history() -> None:  # windows that ran out grow the learned one
            rounds.estimator.mean_s = None

        assert window_of(b"r0") < 1.5
        forget_history()
        rounds._last_start = time.monotonic() - 8.0  # the last round began 8 s ago
        assert window_of(b"r1") >= 2.0  # a quarter of 8 s
        forget_history()
        rounds._last_start = time.monotonic() - 8.0
        rounds.skipped()  # a round skipped just now restarts the period
        assert window_of(b"r2") < 1.5


def _across_swarm(runtimes, dhts, codec="none", max_group_size=3, **config):
    config = RoundsConfig(
        wire_codec=codec, window_initial_s=20.0, max_group_size=max_group_size, **config
    )
    return [
        SwarmRounds(rt, dht.node, swarm="t", config=config)
        for rt, dht in zip(runtimes, dhts, strict=True)
    ]


def _weighted_round(runtimes, rounds, vectors, weights, key: bytes, *, again: bool = False):
    def one(i: int):
        if again:
            coro = rounds[i].again(vectors[i], weights[i], tag=b"/1")
        else:
            coro = rounds[i].average(
                vectors[i], weights[i], round_key=key, expected_peers=len(rounds)
            )
        return runtimes[i].run(coro, timeout_s=60.0)

    with ThreadPoolExecutor(len(rounds)) as pool:
        return list(pool.map(one, range(len(rounds))))


def _mean(inputs, weights, who):
    return sum(weights[i] * inputs[i].double() for i in who) / sum(weights[i] for i in who)


@pytest.mark.parametrize(
    "codec,atol,aggregation",
    [("none", 1e-5, "mean"), ("int8", 0.05, "mean"), ("none", 1e-5, "trimmed_mean")],
)
def test_a_round_of_several_groups_gives_everyone_the_mean_over_all_of_them(
    codec, atol, aggregation
):
    # 7 peers in groups of at most 3: groups of 3, 2 and 2, and two columns across them,
    # one of which holds two members of the group of 3 (its mean must count once). Every
    # peer ends with the same bits, whichever column it averaged in (a robust rule
    # combines each group's members, then the groups' results, each group one vote).
    with _swarm(7) as (runtimes, dhts):
        rounds = _across_swarm(runtimes, dhts, codec, aggregation=aggregation)
        weights = [float(i + 1) for i in range(7)]
        g = torch.Generator().manual_seed(0)
        for again in (False, True):  # a second exchange (low-rank) goes across as well
            inputs = [torch.randn(50_000, generator=g) for _ in range(7)]
            vectors = [x.clone() for x in inputs]
            outcomes = _weighted_round(runtimes, rounds, vectors, weights, b"k", again=again)
            expect = _mean(inputs, weights, range(7))
            if aggregation == "trimmed_mean":  # each group's median (of 3) or mean (of 2)
                expect = _robust_groups_mean(runtimes, inputs, weights)
            for outcome, v in zip(outcomes, vectors, strict=True):
                assert outcome.ok and outcome.included, outcome.reason
                assert outcome.contributors == {rt.peer_id for rt in runtimes}
                # a robust rule trusts no claimed weight: across groups, contributors count
                total = sum(weights) if aggregation == "mean" else 7
                assert outcome.weight == total and outcome.group_size == 7
                assert "across" in outcome.seconds
                assert torch.allclose(v.double(), expect, atol=atol, rtol=0)
            assert all(torch.equal(v, vectors[0]) for v in vectors)
            assert {len(r.last_group.members) for r in rounds} == {2, 3}


def _robust_groups_mean(runtimes, inputs, weights, parts=False):
    """The median of the three groups' trimmed means (a median of 3, a mean of 2); with
    ``parts``, and the groups' results."""
    ready = [ReadyPeer(rt.peer_id.raw, 1.0, 1e8) for rt in runtimes]
    index = {rt.peer_id.raw: i for i, rt in enumerate(runtimes)}
    results = []
    for group in form_groups(b"k/none/trimmed_mean", ready, max_group_size=3):
        stacked = torch.stack([inputs[index[p.peer]] for p in group.members])
        results.append(stacked.median(dim=0).values if len(stacked) == 3 else stacked.mean(dim=0))
    stacked = torch.stack(results).double()
    median = stacked.median(dim=0).values
    return (median, stacked) if parts else median


def _seeded_round(runtimes, rounds, numel):
    """One round of every peer, peer ``i`` with weight ``i + 1`` and a vector seeded ``i``:
    the weights, the inputs, the vectors after the round, and the outcomes."""
    n = len(runtimes)
    weights = [float(i + 1) for i in range(n)]
    inputs = [torch.randn(numel, generator=torch.Generator().manual_seed(i)) for i in range(n)]
    vectors = [x.clone() for x in inputs]
    return weights, inputs, vectors, _weighted_round(runtimes, rounds, vectors, weights, b"k")


def _group_of_size(runtimes, size, key=b"k/none", max_group_size=3):
    """The first group of ``size`` members a round of ``runtimes`` under ``key`` forms."""
    ready = [ReadyPeer(rt.peer_id.raw, 1.0, 1e8) for rt in runtimes]
    return next(
        g for g in form_groups(key, ready, max_group_size=max_group_size) if len(g.members) == size
    )


def _lose_in_columns(runtimes, rounds, lost_members, weights, inputs):
    """A round in which the given peers never reach their columns; the outcomes and
    vectors."""

    async def gone(*args, **kwargs) -> str:
        return "never reached its column (test)"

    index = {rt.peer_id.raw: i for i, rt in enumerate(runtimes)}
    for peer in lost_members:
        rounds[index[peer]]._column_round = gone
    vectors = [x.clone() for x in inputs]
    return _weighted_round(runtimes, rounds, vectors, weights, b"k"), vectors


def test_a_group_still_counts_whole_when_one_of_its_two_members_in_a_column_is_lost():
    with _swarm(7) as (runtimes, dhts):
        rounds = _across_swarm(runtimes, dhts, allreduce_timeout_s=4.0)
        big = _group_of_size(runtimes, 3)
        lost = [rt.peer_id.raw for rt in runtimes].index(big.members[2].peer)
        weights = [float(i + 1) for i in range(7)]
        inputs = [torch.randn(10_000, generator=torch.Generator().manual_seed(i)) for i in range(7)]
        # Members 0 and 2 of the group of 3 share a column; 2 never reaches it.
        outcomes, vectors = _lose_in_columns(
            runtimes, rounds, [big.members[2].peer], weights, inputs
        )
        everyone = _mean(inputs, weights, range(7))
        for i, (outcome, v) in enumerate(zip(outcomes, vectors, strict=True)):
            if i == lost:  # the round failed here: untouched, and told why
                assert not outcome.ok and "never reached its column" in outcome.reason
                assert torch.equal(v, inputs[i])
            else:
                assert outcome.ok, outcome.reason
                assert outcome.weight == sum(weights) and outcome.group_size == 7
                assert torch.allclose(v.double(), everyone, atol=1e-5, rtol=0)


def test_a_column_that_lost_a_groups_only_member_fails_and_no_peer_keeps_another_model():
    # A group of 2 has one member in each column: without it, its column would commit a
    # mean over the other groups only, and its members would hold another model.
    with _swarm(7) as (runtimes, dhts):
        rounds = _across_swarm(runtimes, dhts, allreduce_timeout_s=4.0)
        small = _group_of_size(runtimes, 2)
        weights = [float(i + 1) for i in range(7)]
        inputs = [torch.randn(10_000, generator=torch.Generator().manual_seed(i)) for i in range(7)]
        outcomes, vectors = _lose_in_columns(
            runtimes, rounds, [small.members[0].peer], weights, inputs
        )
        failed = [i for i, o in enumerate(outcomes) if not o.ok]
        assert 2 <= len(failed) < 7  # the lost peer and its column, not the other column
        everyone = _mean(inputs, weights, range(7))
        for i, (outcome, v) in enumerate(zip(outcomes, vectors, strict=True)):
            if outcome.ok:
                assert outcome.weight == sum(weights) and outcome.included
                assert torch.allclose(v.double(), everyone, atol=1e-5, rtol=0)
            else:
                assert torch.equal(v, inputs[i]), i
        assert any("groups missing" in outcomes[i].reason for i in failed)


def test_a_peer_whose_group_went_on_without_it_tells_its_column_not_to_wait(monkeypatch):
    from shoal.parallel.data.rendezvous import Group, NoGroup
    from shoal.train import swarm_round

    with _swarm(7) as (runtimes, dhts):
        rounds = _across_swarm(runtimes, dhts)
        big = _group_of_size(runtimes, 3)
        index = {rt.peer_id.raw: i for i, rt in enumerate(runtimes)}
        lost = index[big.members[2].peer]  # shares a column with big.members[0]
        real = swarm_round.find_group

        async def find_group(board, round_key, me, **kwargs):
            found = await real(board, round_key, me, **kwargs)
            if me.peer == big.members[2].peer and isinstance(found, Group):
                # As when its confirmation came too late: its group goes on without it.
                await rounds[lost]._leave(found)
                return NoGroup("no group formed (test)", round_groups=found.round_groups)
            return found

        monkeypatch.setattr(swarm_round, "find_group", find_group)
        weights, inputs, vectors, outcomes = _seeded_round(runtimes, rounds, 10_000)
        others = [i for i in range(7) if i != lost]
        assert not outcomes[lost].ok and torch.equal(vectors[lost], inputs[lost])
        for i in others:
            assert outcomes[i].ok and outcomes[i].weight == sum(weights[j] for j in others)
            assert torch.allclose(vectors[i].double(), _mean(inputs, weights, others), atol=1e-5)
            # its column did not wait for it (the collect deadline comes at 16.5 s)
            assert outcomes[i].seconds["across"] < 8.0, outcomes[i].seconds


def test_a_column_member_bringing_another_groups_tag_is_refused():
    from shoal.parallel.data.matchmaking import members_tag, round_order

    with _swarm(7) as (runtimes, dhts):
        rounds = _across_swarm(runtimes, dhts)
        ready = [ReadyPeer(rt.peer_id.raw, 1.0, 1e8) for rt in runtimes]
        groups = form_groups(b"k/none", ready, max_group_size=3)
        big = next(g for g in groups if len(g.members) == 3)
        other = next(g for g in groups if g is not big)
        ids = [rt.peer_id.raw for rt in runtimes]
        liar = ids.index(big.members[2].peer)  # its twin big.members[0] is in its column
        average = rounds[liar].averager.average

        async def lying(tensors, weight, **kwargs):
            if kwargs.get("tag"):  # in its column: another group's mean, made up
                kwargs["tag"] = members_tag(round_order(groups), [p.peer for p in other.members])
                tensors = [torch.randn_like(t) for t in tensors]
            return await average(tensors, weight, **kwargs)

        rounds[liar].averager.average = lying
        refused: list[str] = []
        for r in rounds:
            penalize = r._penalize

            def noted(screened, penalize=penalize):
                refused.extend(why for peer, why in screened.items() if peer.raw == ids[liar])
                penalize(screened)

            r._penalize = noted
        weights, inputs, vectors, outcomes = _seeded_round(runtimes, rounds, 10_000)
        everyone = _mean(inputs, weights, range(7))  # the liar was honest in its group
        for i, (outcome, v) in enumerate(zip(outcomes, vectors, strict=True)):
            if i != liar:
                assert outcome.ok, (i, outcome.reason)
                assert torch.allclose(v.double(), everyone, atol=1e-5, rtol=0), i
        assert "marks peers of another group" in " ".join(refused)  # held against it


def test_peers_whose_column_failed_decline_the_second_exchange_their_groups_run():
    with _swarm(7) as (runtimes, dhts):
        # min_contributors=1: a group whose other members decline still runs its part
        rounds = _across_swarm(runtimes, dhts, allreduce_timeout_s=10.0, min_contributors=1)
        small = _group_of_size(runtimes, 2)
        weights = [float(i + 1) for i in range(7)]
        inputs = [torch.randn(1000, generator=torch.Generator().manual_seed(i)) for i in range(7)]
        outcomes, _ = _lose_in_columns(runtimes, rounds, [small.members[0].peer], weights, inputs)
        ok = [i for i, o in enumerate(outcomes) if o.ok]
        assert 0 < len(ok) < 7

        def second(i: int):
            if i not in ok:  # as low-rank DiLoCo does when its first exchange failed
                runtimes[i].run(rounds[i].decline_again(b"/1"), timeout_s=10.0)
                return None
            t0 = time.monotonic()
            coro = rounds[i].again(torch.full((1000,), float(i)), 1.0, tag=b"/1")
            return runtimes[i].run(coro, timeout_s=60.0), time.monotonic() - t0

        with ThreadPoolExecutor(7) as pool:
            results = dict(zip(range(7), pool.map(second, range(7)), strict=True))
        for i in ok:
            outcome, took = results[i]
            # A group that kept no majority of its members fails across groups (at once)
            assert outcome.ok or "of its group's" in outcome.reason, outcome.reason
            # the decliners were not waited for until the collect deadline (5.5 s)
            assert took < 4.0, took


def test_a_peer_its_column_left_out_takes_no_part_in_the_second_exchange():
    with _swarm(7) as (runtimes, dhts):
        rounds = _across_swarm(runtimes, dhts, allreduce_timeout_s=10.0)
        big = _group_of_size(runtimes, 3)
        odd = [rt.peer_id.raw for rt in runtimes].index(big.members[2].peer)
        average = rounds[odd].averager.average

        async def refused_in_column(tensors, weight, **kwargs):
            if kwargs.get("tag"):  # screened out there; its twin brings its group's mean
                tensors = [torch.full_like(t, float("nan")) for t in tensors]
            return await average(tensors, weight, **kwargs)

        rounds[odd].averager.average = refused_in_column
        weights, _inputs, _vectors, outcomes = _seeded_round(runtimes, rounds, 1000)
        assert all(o.ok and o.weight == sum(weights) for o in outcomes)
        assert outcomes[odd].included  # its values are in the mean, by its twin
        rounds[odd].averager.average = average

        def second(i: int):
            t0 = time.monotonic()
            coro = rounds[i].again(torch.full((1000,), float(i)), 1.0, tag=b"/1")
            return runtimes[i].run(coro, timeout_s=60.0), time.monotonic() - t0

        with ThreadPoolExecutor(7) as pool:
            results = list(pool.map(second, range(7)))
        for i, (outcome, took) in enumerate(results):
            if i == odd:
                assert not outcome.ok and "left out of its column" in outcome.reason
            else:
                assert outcome.ok and outcome.group_size == 7, outcome.reason
                assert took < 4.0, took  # no one waited for it (collect deadline: 5.5 s)


def test_a_group_confirmed_as_two_halves_cannot_give_the_swarm_two_models(monkeypatch):
    # Each half agrees on itself (as when posts land late) and both halves' rounds succeed:
    # each column would take one half's mean for the group's, another in each column.
    import hashlib

    from shoal.parallel.data.rendezvous import Group
    from shoal.train import swarm_round

    with _swarm(8) as (runtimes, dhts):
        rounds = _across_swarm(runtimes, dhts, max_group_size=4, allreduce_timeout_s=4.0)
        ready = [ReadyPeer(rt.peer_id.raw, 1.0, 1e8) for rt in runtimes]
        split = form_groups(b"k/none", ready, max_group_size=4)[0]
        halves = [split.members[:2], split.members[2:]]
        real = swarm_round.find_group

        async def find_group(board, round_key, me, **kwargs):
            found = await real(board, round_key, me, **kwargs)
            half = next((h for h in halves if me in h), None)
            if isinstance(found, Group) and half is not None:
                digest = hashlib.blake2b(found.group_id + b"/half", digest_size=16)
                digest.update(b"".join(p.peer for p in half))
                return Group(digest.digest(), tuple(half), round_groups=found.round_groups)
            return found

        monkeypatch.setattr(swarm_round, "find_group", find_group)
        _weights, inputs, vectors, outcomes = _seeded_round(runtimes, rounds, 1000)
        ok = [i for i, o in enumerate(outcomes) if o.ok]
        assert len({vectors[i].numpy().tobytes() for i in ok}) <= 1
        assert len({outcomes[i].contributors for i in ok}) <= 1
        for i, outcome in enumerate(outcomes):
            if not outcome.ok:
                assert torch.equal(vectors[i], inputs[i])


@pytest.mark.parametrize("lie", ["values", "weight"])
def test_a_liar_alone_for_its_group_in_a_column_cannot_set_a_robust_columns_result(lie):
    with _swarm(7) as (runtimes, dhts):
        rounds = _across_swarm(runtimes, dhts, aggregation="trimmed_mean")
        small = _group_of_size(runtimes, 2, b"k/none/trimmed_mean")  # one in each column
        liar = [rt.peer_id.raw for rt in runtimes].index(small.members[0].peer)
        average = rounds[liar].averager.average
        poison = torch.full((10_000,), 3.0)

        async def lying(tensors, weight, **kwargs):
            if kwargs.get("tag"):  # its group's honest tag, with its own values or weight
                if lie == "values":
                    tensors = [poison.clone()]
                else:
                    weight = 2.0**40
            return await average(tensors, weight, **kwargs)

        rounds[liar].averager.average = lying
        weights, inputs, vectors, outcomes = _seeded_round(runtimes, rounds, 10_000)
        honest, results = _robust_groups_mean(runtimes, inputs, weights, parts=True)
        low, high = results.min(dim=0).values, results.max(dim=0).values
        for i, (outcome, v) in enumerate(zip(outcomes, vectors, strict=True)):
            if i == liar:
                continue
            if not outcome.ok:  # its column went without the liar's group: untouched
                assert lie == "weight" and torch.equal(v, inputs[i])
            elif not torch.allclose(v.double(), honest, atol=1e-5, rtol=0):
                # The liar's column: the median of three group results is one of the two
                # honest ones wherever the lie is not (a known limit: that column's
                # members hold another model than the rest until the peers realign).
                assert lie == "values"
                assert bool(((v.double() >= low - 1e-6) & (v.double() <= high + 1e-6)).all())
        if lie == "weight":  # refused at the reducers: never averaged anywhere
            assert not any(
                o.ok and not torch.allclose(v.double(), honest, atol=1e-5, rtol=0)
                for o, v in zip(outcomes, vectors, strict=True)
            )


def test_a_peer_whose_column_failed_alone_declines_the_columns_second_exchange_too():
    with _swarm(7) as (runtimes, dhts):
        rounds = _across_swarm(runtimes, dhts, allreduce_timeout_s=10.0)
        big = _group_of_size(runtimes, 3)
        odd = [rt.peer_id.raw for rt in runtimes].index(big.members[2].peer)
        across = rounds[odd]._column_round

        async def failed_here(*args, **kwargs) -> str:
            await across(*args, **kwargs)  # the others commit with it
            return "a part never arrived here (test)"

        rounds[odd]._column_round = failed_here
        _, _, _, outcomes = _seeded_round(runtimes, rounds, 1000)
        assert [i for i, o in enumerate(outcomes) if not o.ok] == [odd]
        odd_id = runtimes[odd].peer_id  # kept by the others for their follow-up
        assert any(r.last_across and odd_id in r.last_across.column.members for r in rounds)

        def second(i: int):
            t0 = time.monotonic()
            if i == odd:  # as low-rank DiLoCo does when its first exchange failed
                runtimes[i].run(rounds[i].decline_again(b"/1"), timeout_s=10.0)
                return None, 0.0
            coro = rounds[i].again(torch.full((1000,), float(i)), 1.0, tag=b"/1")
            return runtimes[i].run(coro, timeout_s=60.0), time.monotonic() - t0

        with ThreadPoolExecutor(7) as pool:
            results = list(pool.map(second, range(7)))
        for i, (outcome, took) in enumerate(results):
            if i != odd:
                assert outcome.ok, outcome.reason  # its twin brings its group
                assert took < 4.0, took  # not waited for (collect deadline: 5.5 s)
