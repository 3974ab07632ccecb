"""Maintenance re-joins through the bootstrap addresses, so a healed partition reconnects."""

import asyncio
import itertools

import pytest

from shoal.dht.config import DHTConfig
from shoal.dht.maintenance import maintenance_round
from shoal.dht.node import DHTNode
from shoal.dht.routing import RoutingTable
from shoal.dht.virtual_loop import run_virtual
from shoal.errors import ConfigError, PeerUnavailable
from shoal.net.config import RetryPolicy

from .conftest import grow, make_cluster


def _forget_everyone(node) -> None:
    """What a long partition leaves behind: every contact failed and was dropped."""
    cfg = node.config
    node.table = RoutingTable(
        node.table.own_id,
        k=cfg.k,
        replacement_size=cfg.replacement_cache_size,
        max_failures=cfg.max_failures,
    )


@pytest.mark.parametrize("rejoin_interval_s", [60.0, 0.0])
def test_node_that_lost_all_contacts_finds_the_swarm_again(rejoin_interval_s):
    async def scenario():
        cl = make_cluster(rejoin_interval_s=rejoin_interval_s)
        await grow(cl, 12)
        lonely = cl.nodes[-1]
        assert lonely.seeds, "bootstrap remembers its addresses"
        _forget_everyone(lonely)
        assert (await lonely.lookup(lonely.table.own_id)).closest == []  # nobody to ask

        await asyncio.sleep(61.0)  # virtual time: the re-join is due
        await maintenance_round(lonely)
        if rejoin_interval_s:
            assert len(lonely.table) >= cl.config.k // 2
            found = await lonely.lookup(cl.nodes[0].table.own_id)
            assert cl.nodes[0].contact in found.closest
        else:
            assert len(lonely.table) == 0
        await cl.close()

    run_virtual(scenario())


def test_rejoin_interval_must_not_be_negative():
    with pytest.raises(ConfigError, match="rejoin_interval_s"):
        DHTConfig(rejoin_interval_s=-1.0)


def _restart(cluster, node):
    """``node`` comes back with its identity and address but an empty table (a seed peer
    started without bootstrap addresses knows nobody)."""
    again = DHTNode(
        node.identity,
        cluster.network.transport(None),
        address=node.contact.address,
        config=cluster.config,
        wall_clock=cluster.wall_clock,
    )
    again.transport = cluster.network.transport(again.contact)
    cluster.network.listen(again.contact, again)
    again.start()
    return again


@pytest.mark.parametrize("seed_check_s", [10.0, 0.0])
def test_a_restarted_seed_peer_is_found_again_within_the_seed_check(seed_check_s):
    async def scenario():
        cl = make_cluster(maintenance=True, seed_check_s=seed_check_s)
        seed = await cl.add_node()
        joiner = await cl.add_node(join_via=1)
        assert joiner.seeds == (seed.contact.address,) and seed.contact in joiner.table
        await cl.kill(seed)
        for _ in range(cl.config.max_failures):  # its calls to the seed failed meanwhile
            joiner.table.failed(seed.contact)
        assert seed.contact not in joiner.table
        seed = _restart(cl, seed)
        await asyncio.sleep(25.0)  # virtual time; the full re-join is 60 s away
        found = (joiner.contact in seed.table, seed.contact in joiner.table)
        await seed.close()
        await cl.close()
        return found

    found = run_virtual(scenario())
    # without the seed check both stay strangers until the next full re-join
    assert found == ((True, True) if seed_check_s else (False, False))


def test_a_failed_first_join_is_tried_again():
    async def scenario():
        cl = make_cluster(maintenance=True)
        seed = cl.make_node()
        cl.network.unlisten(seed.contact.address)  # not up yet
        joiner = cl.make_node()
        with pytest.raises(PeerUnavailable):
            await joiner.bootstrap([seed.contact.address], RetryPolicy(attempts=1))
        joiner.start()
        cl.network.listen(seed.contact, seed)
        await asyncio.sleep(25.0)
        found = seed.contact in joiner.table and joiner.contact in seed.table
        await joiner.close()
        await seed.close()
        return found

    assert run_virtual(scenario())


def _count_pings(node) -> list[float]:
    """Loop times at which ``node`` pinged a bootstrap address."""
    times: list[float] = []
    ping = node.transport.ping_address

    async def counted(address, *, timeout_s):
        times.append(asyncio.get_running_loop().time())
        return await ping(address, timeout_s=timeout_s)

    node.transport.ping_address = counted
    return times


def test_a_seed_gone_for_good_is_pinged_ever_less_often():
    # It used to be pinged every seed_check_s (10 s) for as long as the node ran.
    async def scenario():
        cl = make_cluster(maintenance=True, seed_check_s=10.0, rejoin_interval_s=60.0)
        seed = await cl.add_node()
        joiner = await cl.add_node(join_via=1)
        await cl.add_node(join_via=2)  # someone else to know
        pings = _count_pings(joiner)
        await cl.kill(seed)
        for _ in range(cl.config.max_failures):
            joiner.table.failed(seed.contact)
        assert joiner.seeds_missing()
        await asyncio.sleep(600.0)  # virtual time
        await cl.close()
        await joiner.close()
        return pings

    pings = run_virtual(scenario())
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    # a few checks sooner, then about one per re-join (60 s); a join's retry within a
    # second of its first try is the same attempt
    spaced = [g for g in gaps if g > 2.0]
    assert 1 <= len([g for g in spaced if g < 50.0]) <= 3, gaps
    assert len(spaced) <= 14 and all(g > 5.0 for g in spaced), gaps


def test_a_seed_back_under_a_new_identity_counts_as_found():
    # Its old identity was looked for forever: the seed check never stopped.
    async def scenario():
        cl = make_cluster(maintenance=True, seed_check_s=10.0)
        seed = await cl.add_node()
        joiner = await cl.add_node(join_via=1)
        address = seed.contact.address
        await cl.kill(seed)
        for _ in range(cl.config.max_failures):
            joiner.table.failed(seed.contact)
        other = cl.make_node(serve=False)  # a new identity...
        reborn = DHTNode(
            other.identity,
            cl.network.transport(None),
            address=address,  # ...at the old address
            config=cl.config,
            wall_clock=cl.wall_clock,
        )
        reborn.transport = cl.network.transport(reborn.contact)
        cl.network.listen(reborn.contact, reborn)
        reborn.start()
        await asyncio.sleep(25.0)
        result = joiner.seeds_missing(), reborn.contact in joiner.table
        await reborn.close()
        await cl.close()
        return result

    assert run_virtual(scenario()) == (False, True)
