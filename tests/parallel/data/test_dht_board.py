"""Matchmaking over the real DHT protocol (simulated swarm on a virtual clock)."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from shoal.dht.config import DHTConfig, RecordLimits
from shoal.dht.memory import MemoryNetwork, SimConfig
from shoal.dht.sim import SimCluster
from shoal.dht.virtual_loop import run_virtual
from shoal.errors import ConfigError
from shoal.parallel.data.dht_board import DhtBoard, _parse
from shoal.parallel.data.matchmaking import FormationConfig, FormationEstimator, Group, ReadyPeer
from shoal.parallel.data.rendezvous import MatchConfig, find_group


def test_peers_find_one_group_through_the_dht_and_ids_come_from_signed_subkeys():
    async def scenario():
        cluster = SimCluster(
            MemoryNetwork(SimConfig(), seed=1), DHTConfig(k=8, rpc_timeout_s=1.0), seed=1
        )
        for _ in range(12):
            await cluster.add_node()
        peers = cluster.nodes[:4]

        async def one(i, node):
            me = ReadyPeer(node.identity.peer_id.raw, float(i + 1), 1e8, False, f"10.0.0.{i}:1")
            return await find_group(
                DhtBoard(node),
                b"round-7",
                me,
                expected_peers=4,
                estimator=FormationEstimator(FormationConfig(initial_s=30.0)),
                config=MatchConfig(poll_interval_s=0.5),
                clock=cluster.wall_clock,
            )

        groups = await asyncio.gather(*(one(i, n) for i, n in enumerate(peers)))
        await cluster.close()
        return peers, groups

    peers, groups = run_virtual(scenario())
    assert all(g is not None for g in groups)
    assert len({g.group_id for g in groups}) == 1
    members = {m.peer: m for m in groups[0].members}
    assert set(members) == {p.identity.peer_id.raw for p in peers}
    for i, p in enumerate(peers):
        assert members[p.identity.peer_id.raw].address == f"10.0.0.{i}:1"
        assert members[p.identity.peer_id.raw].weight == i + 1


def test_more_peers_than_a_group_holds_form_matching_groups_through_the_dht():
    # 80 ready peers, groups of at most 64. Answers of at most 64 records showed each reader
    # a different subset, and windows closed as soon as 64 were seen: 24 of 80 peers formed
    # no group and the rest split into groups of 2 to 25 (6 groups).
    n = 80

    async def scenario():
        cluster = SimCluster(
            MemoryNetwork(SimConfig(), seed=1), DHTConfig(k=8, rpc_timeout_s=1.0), seed=1
        )
        for _ in range(n + 8):
            await cluster.add_node()

        async def one(i, node):
            me = ReadyPeer(node.identity.peer_id.raw, 1.0, 1e8, False, f"10.0.0.{i}:1")
            return await find_group(
                DhtBoard(node),
                b"round-8",
                me,
                expected_peers=n,
                estimator=FormationEstimator(FormationConfig(initial_s=30.0)),
                config=MatchConfig(poll_interval_s=0.5, max_group_size=64),
                clock=cluster.wall_clock,
            )

        peers = cluster.nodes[:n]
        groups = await asyncio.gather(*(one(i, node) for i, node in enumerate(peers)))
        await cluster.close()
        return peers, groups

    peers, groups = run_virtual(scenario())
    assert all(isinstance(g, Group) for g in groups), [
        g for g in groups if not isinstance(g, Group)
    ][:3]
    by_id = {g.group_id: g for g in groups}
    assert sorted(len(g.members) for g in by_id.values()) == [40, 40]
    for peer, group in zip(peers, groups, strict=True):
        assert peer.identity.peer_id.raw in {m.peer for m in group.members}
    assert {m.peer for g in by_id.values() for m in g.members} == {
        p.identity.peer_id.raw for p in peers
    }


def test_a_window_waits_for_no_more_peers_than_a_board_read_can_show():
    assert MatchConfig().max_board_entries == RecordLimits().max_records_per_message
    with pytest.raises(ConfigError, match="max_board_entries"):
        MatchConfig(max_group_size=64, max_board_entries=32)


def test_malformed_board_records_are_skipped():
    from shoal.parallel.data.dht_board import BOARD_VERSION as V

    peer, n = b"p" * 32, b"n" * 8
    good = msgpack.packb([V, 2.0, 1e8, 1e8, False, "h:1", 4, n, True])
    assert _parse(peer, good) == ReadyPeer(peer, 2.0, 1e8, False, "h:1", 4, n, 1e8)
    assert _parse(peer, good).closed
    for bad_subkey, bad_value in [
        (peer[:31], good),
        (peer, b"\xc1"),
        (peer, msgpack.packb([2, 2.0, 1e8, False, "h:1", 4])),  # the version before nonces
        (peer, msgpack.packb([3, 2.0, 1e8, False, "h:1", 4, n])),  # before the closed mark
        (peer, msgpack.packb([4, 2.0, 1e8, False, "h:1", 4, n, False])),  # before downlinks
        (peer, msgpack.packb([5, 2.0, 1e8, 1e8, False, "h:1", 4, n, False])),  # read another way
        (peer, msgpack.packb([6, 2.0, 1e8, 1e8, False, "h:1", 4, n, False])),  # no columns
        (peer, msgpack.packb([8, 2.0, 1e8, 1e8, False, "h:1", 4, n, False])),
        (peer, msgpack.packb([V, 2.0, 1e8, -1.0, False, "h:1", 4, n, False])),
        (peer, msgpack.packb([V, 2.0, 1e8, float("inf"), False, "h:1", 4, n, False])),
        (peer, msgpack.packb([V, 2.0, 1e8, 1e8, False, "h:1", 4, n, 1])),
        (peer, msgpack.packb([V, float("nan"), 1e8, 1e8, False, "h:1", 4, n, False])),
        (peer, msgpack.packb([V, -1.0, 1e8, 1e8, False, "h:1", 4, n, False])),
        (peer, msgpack.packb([V, 1.0, 1e8, 1e8, 1, "h:1", 4, n, False])),
        (peer, msgpack.packb([V, 1.0, 1e8, 1e8, False, "x" * 300, 4, n, False])),
        (peer, msgpack.packb([V, 1.0, 1e8, 1e8, False, "h:1", -1, n, False])),
        (peer, msgpack.packb([V, 1.0, 1e8, 1e8, False, "h:1", 1 << 20, n, False])),
        (peer, msgpack.packb([V, 1.0, 1e8, 1e8, False, "h:1", True, n, False])),
        (peer, msgpack.packb([V, 1.0, 1e8, 1e8, False, "h:1", 4.0, n, False])),
        (peer, msgpack.packb([V, 1.0, 1e8, 1e8, False, "h:1", 4, b"n" * 7, False])),
        (peer, msgpack.packb([V, 1.0, 1e8, 1e8, False, "h:1", 4, "n" * 8, False])),
        (peer, msgpack.packb({"weight": 1})),
        (peer, b"\x00" * 600),
    ]:
        assert _parse(bad_subkey, bad_value) is None


def test_writes_under_one_key_get_increasing_expiries():
    # The DHT keeps the record that expires last: a retry's shorter window (or a post right
    # after a withdrawal) would be refused, leaving the earlier attempt's record up.
    class Store:
        def __init__(self):
            self.writes = []

        async def store(self, key, value, expires_at, subkey=None):
            self.writes.append((key, expires_at))
            return 1

        async def get_records(self, key):
            return []

    async def main():
        store = Store()
        board = DhtBoard(store)
        me = ReadyPeer(b"p" * 32, 1.0, 1e8, nonce=b"n" * 8)
        await board.announce(b"k", me, expires_at=131.0)
        await board.announce(b"k", me, expires_at=113.0)  # the retry's window is shorter
        await board.confirm(b"k", me.peer, b"n" * 8 + b"g" * 16, expires_at=70.0)
        await board.confirm(b"k", me.peer, b"n" * 8 + b"\0", expires_at=70.0)
        await board.announce(b"other", me, expires_at=5.0)
        return store.writes

    (k1, e1), (k2, e2), (c1, f1), (c2, f2), (_, g) = asyncio.run(main())
    assert k1 == k2 and e1 == 131.0 and e2 > e1
    assert c1 == c2 and f2 > f1 == 70.0
    assert g == 5.0  # another key starts afresh


@pytest.mark.parametrize("b_starts_s", [0.0, 2.0])
def test_a_restarted_peer_outlives_its_earlier_runs_records_and_meets_the_others(b_starts_s):
    # A peer restarted from its checkpoint meets under the key its earlier run last used,
    # with the same subkey: the DHT keeps that run's records (they expire later) and
    # refused the new ones, so the restarted peer never joined a group again.
    async def scenario():
        cluster = SimCluster(
            MemoryNetwork(SimConfig(), seed=2), DHTConfig(k=8, rpc_timeout_s=1.0), seed=2
        )
        for _ in range(6):
            await cluster.add_node()
        a, b = cluster.nodes[:2]
        ids = [n.identity.peer_id.raw for n in (a, b)]
        earlier = DhtBoard(a)  # the run before the restart: same identity, its own memory
        now = cluster.wall_clock()
        old = ReadyPeer(ids[0], 1.0, 1e8, False, "10.0.0.0:1", 2, b"o" * 8)
        await earlier.announce(b"round-3", old, expires_at=now + 100.0)
        await earlier.confirm(b"round-3", ids[0], b"o" * 8 + b"g" * 16, expires_at=now + 200.0)

        boards = [DhtBoard(a), DhtBoard(b)]  # each peer keeps its board across rounds

        async def one(i, start_s=0.0):
            await asyncio.sleep(start_s)
            me = ReadyPeer(ids[i], 1.0, 1e8, False, f"10.0.0.{i}:1")
            return await find_group(
                boards[i],
                b"round-3",
                me,
                expected_peers=2,
                estimator=FormationEstimator(FormationConfig(initial_s=5.0)),
                config=MatchConfig(poll_interval_s=0.5),
                clock=cluster.wall_clock,
            )

        first = await asyncio.gather(one(0), one(1, b_starts_s))
        second = await asyncio.gather(one(0), one(1))
        await cluster.close()
        return ids, first, second

    ids, first, second = run_virtual(scenario())
    # Starting together, b may close its first window on the earlier run's entry before a
    # replaces it; that attempt then fails for both, and the next one must succeed. When b
    # comes later, it reads a's new entry and confirmation: the first attempt succeeds.
    attempts = [second] if b_starts_s == 0.0 else [first, second]
    for groups in attempts:
        assert all(isinstance(g, Group) for g in groups), (first, second)
        assert groups[0] == groups[1] and {m.peer for m in groups[0].members} == set(ids)
