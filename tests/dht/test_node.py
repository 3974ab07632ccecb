import asyncio

import pytest

from shoal.dht.config import RecordLimits
from shoal.dht.ids import location_of
from shoal.dht.node import merge_records
from shoal.dht.record import Record, sign_record
from shoal.dht.transport import FindValueAnswer
from shoal.dht.virtual_loop import run_virtual
from shoal.errors import ConfigError, PeerUnavailable
from shoal.net.config import RetryPolicy
from shoal.net.identity import Identity

from .conftest import grow, make_cluster


def test_store_and_get_plain_and_dictionary_keys():
    async def scenario():
        cl = make_cluster()
        await grow(cl, 30)
        a, b, reader = cl.nodes[3], cl.nodes[7], cl.nodes[-1]
        exp = cl.wall_clock() + 600
        assert await a.store(b"plain", b"first", exp) >= cl.config.k
        assert await b.store(b"plain", b"second", exp + 5) >= cl.config.k
        assert await reader.get(b"plain") == b"second"  # freshest writer wins
        await a.store(b"dict", b"va", exp, subkey=b"")
        await b.store(b"dict", b"vb", exp, subkey=b"/x")
        got = await reader.get(b"dict")
        assert got == {a.identity.peer_id.raw: b"va", b.identity.peer_id.raw + b"/x": b"vb"}
        assert await reader.get(b"missing") is None
        client = await cl.add_node(serve=False)  # a client-only node reads too
        assert await client.get(b"plain") == b"second"
        await cl.close()
        await client.close()

    run_virtual(scenario())


def test_local_store_refuses_bad_records():
    async def scenario():
        cl = make_cluster()
        await grow(cl, 3)
        node = cl.nodes[0]
        with pytest.raises(ConfigError, match="expired"):
            await node.store(b"k", b"v", cl.wall_clock() - 1)
        with pytest.raises(ConfigError, match="too large"):
            await node.store(b"k", b"v" * 100_000, cl.wall_clock() + 10)
        await cl.close()

    run_virtual(scenario())


def test_lookup_with_dead_nodes_returns_within_deadline():
    async def scenario():
        cl = make_cluster(lookup_timeout_s=2.5, rpc_timeout_s=1.0)
        await grow(cl, 40)
        exp = cl.wall_clock() + 600
        await cl.nodes[0].store(b"key", b"value", exp)
        reader = cl.nodes[1]
        for victim in cl.nodes[2:32]:  # three quarters of the swarm dies silently
            await cl.kill(victim)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        res = await reader.lookup(123456789, find_value=False)
        assert loop.time() - t0 <= 2.5 + 1e-6
        assert res.rpcs > 0
        t0 = loop.time()
        await reader.get(b"key")
        assert loop.time() - t0 <= 2.5 + 1e-6
        await cl.close()

    run_virtual(scenario())


def test_bootstrap_with_one_dead_address_and_with_none_alive():
    async def scenario():
        cl = make_cluster()
        await grow(cl, 10)
        live = cl.nodes[4].contact.address
        newcomer = cl.make_node()
        size = await newcomer.bootstrap(["sim:dead", live], RetryPolicy(attempts=2))
        assert size >= 5
        loner = cl.make_node()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        policy = RetryPolicy(attempts=3, initial_s=0.5, deadline_s=20)
        with pytest.raises(PeerUnavailable, match=r"none of the 2 bootstrap .*sim:gone1"):
            await loner.bootstrap(["sim:gone1", "sim:gone2"], policy)
        # 3 rounds of 1 s RPC deadline + two pauses of at most 0.6 s and 1.2 s
        assert 3.0 <= loop.time() - t0 <= 4.9
        with pytest.raises(ConfigError):
            await loner.bootstrap([loner.contact.address])
        await cl.close()

    run_virtual(scenario())


def test_handlers_bound_message_sizes():
    async def scenario():
        cl = make_cluster()
        await grow(cl, 2)
        node = cl.nodes[0]
        ident = Identity.from_seed(b"w")
        limit = cl.config.limits.max_records_per_message
        recs = [
            sign_record(ident, b"k%d" % i, b"v", cl.wall_clock() + 60) for i in range(limit + 36)
        ]
        answer = node.handle_store(None, recs)
        assert len(answer.results) == cl.config.limits.max_records_per_message
        assert len(node.storage) == cl.config.limits.max_records_per_message
        await cl.close()

    run_virtual(scenario())


def test_a_find_value_answer_holds_the_freshest_records_within_its_count_and_bytes():
    async def scenario():
        cl = make_cluster(limits=RecordLimits(max_records_per_message=8, max_answer_bytes=4000))
        await grow(cl, 2)
        node, now = cl.nodes[0], cl.wall_clock()
        writers = [Identity.from_seed(b"w%d" % i) for i in range(12)]
        records = [
            sign_record(w, b"board", bytes(v), now + 60 + i, subkey=w.peer_id.raw)
            for i, (w, v) in enumerate(zip(writers, [10] * 6 + [1000] * 6, strict=True))
        ]
        for record in records:  # one per message: a STORE carries at most 8 here
            node.handle_store(None, [record])
        small = sign_record(writers[0], b"few", b"v", now + 60, subkey=writers[0].peer_id.raw)
        node.handle_store(None, [small])
        await cl.close()
        return (
            node.handle_find_value(None, location_of(b"board")).records,
            node.handle_find_value(None, location_of(b"few")).records,
            records,
        )

    answer, few, records = run_virtual(scenario())
    # The six 1000-byte records expire last: three fit in 4000 bytes, the count allows 8.
    assert [r.expires_at for r in answer] == [r.expires_at for r in records[-1:-4:-1]]
    assert sum(r.size_bytes for r in answer) <= 4000 < sum(r.size_bytes for r in records[-4:])
    assert len(few) == 1


def test_a_writer_with_many_subkeys_does_not_crowd_others_out_of_an_answer():
    # One writer may own any number of subkeys under a key. With the freshest first, 20
    # long-lived records of one writer filled an answer of 8 and hid the 5 other writers'
    # (a rendezvous board's readers then saw nobody ready).
    async def scenario():
        cl = make_cluster(limits=RecordLimits(max_records_per_message=8))
        await grow(cl, 2)
        node, now = cl.nodes[0], cl.wall_clock()
        flood = Identity.from_seed(b"flood")
        honest = [Identity.from_seed(b"h%d" % i) for i in range(5)]
        for i in range(20):
            sub = flood.peer_id.raw + b"%d" % i
            node.handle_store(None, [sign_record(flood, b"board", b"x", now + 3600 + i, sub)])
        for w in honest:
            node.handle_store(None, [sign_record(w, b"board", b"v", now + 30, w.peer_id.raw)])
        await cl.close()
        return node.handle_find_value(None, location_of(b"board")).records, flood, honest

    answer, flood, honest = run_virtual(scenario())
    writers = [r.writer for r in answer]
    assert len(answer) == 8
    assert set(writers) >= {w.peer_id for w in honest}  # every honest writer is there
    assert writers.count(flood.peer_id) == 3
    # The flood's records that made it are its three freshest, one in each turn.
    kept = [r.subkey[32:] for r in answer if r.writer == flood.peer_id]
    assert kept == [b"19", b"18", b"17"]


def test_merge_records_picks_freshest_per_subkey():
    a, b = Identity.from_seed(b"a"), Identity.from_seed(b"b")
    recs = [
        sign_record(a, b"k", b"old", 100.0),
        sign_record(b, b"k", b"new", 200.0),
    ]
    assert merge_records(recs) == b"new"
    assert merge_records([]) is None


def test_close_is_idempotent_and_cancels_maintenance():
    async def scenario():
        cl = make_cluster(maintenance=True)
        await grow(cl, 3)
        node = cl.nodes[0]
        assert len(node.tasks) >= 1
        await node.close()
        await node.close()
        assert len(node.tasks) == 0
        await cl.close()

    run_virtual(scenario())


def test_reader_ignores_forged_records_served_by_malicious_holders():
    async def scenario():
        cl = make_cluster()
        await grow(cl, 12)
        exp = cl.wall_clock() + 600
        writer = cl.nodes[0]
        await writer.store(b"k", b"honest", exp)
        honest = sign_record(writer.identity, b"k", b"honest", exp)
        forged = Record(b"k", b"", b"evil", exp + 1, honest.writer, honest.signature)
        served = []

        def evil(inner):
            def handle_find_value(caller, location):
                answer = inner(caller, location)
                served.append(location)
                return FindValueAnswer([forged, *answer.records], answer.closer)

            return handle_find_value

        for node in cl.nodes[:-1]:  # every holder serves a forged, fresher record
            node.handle_find_value = evil(node.handle_find_value)
        assert await cl.nodes[-1].get(b"k") == b"honest"
        assert served  # the forgery really was offered
        await cl.close()

    run_virtual(scenario())


def test_slow_rpcs_free_their_lane():
    """With dead nodes around, freeing lanes after slow_rpc_s makes lookups finish sooner."""

    def total_lookup_time(slow_rpc_s: float) -> float:
        async def scenario() -> float:
            cl = make_cluster(seed=4, rpc_timeout_s=1.0, slow_rpc_s=slow_rpc_s)
            await grow(cl, 40)
            for victim in cl.nodes[::3]:
                await cl.kill(victim)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for i, node in enumerate(cl.nodes[:10]):
                await node.lookup(i * 7919 << 200)
            elapsed = loop.time() - t0
            await cl.close()
            return elapsed

        return run_virtual(scenario())

    assert total_lookup_time(0.2) < 0.8 * total_lookup_time(1.0)
