"""Maintenance re-joins through the bootstrap addresses, so a healed partition reconnects."""

import asyncio

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
