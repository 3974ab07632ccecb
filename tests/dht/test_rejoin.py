"""Maintenance re-joins through the bootstrap addresses, so a healed partition reconnects."""

import asyncio

import pytest

from shoal.dht.config import DHTConfig
from shoal.dht.maintenance import maintenance_round
from shoal.dht.routing import RoutingTable
from shoal.dht.virtual_loop import run_virtual
from shoal.errors import ConfigError

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
