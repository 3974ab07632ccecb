"""Data stays available while the whole original swarm is replaced (thanks to republishing)."""

import pytest

from shoal.dht.virtual_loop import run_virtual

from .conftest import grow, make_cluster


def _churn_run(republish_interval_s: float) -> tuple[int, int]:
    async def scenario() -> tuple[int, int]:
        cl = make_cluster(
            seed=3,
            maintenance=True,
            loss=0.02,
            republish_interval_s=republish_interval_s,
            maintenance_period_s=30.0,
        )
        await grow(cl, 40)
        exp = cl.wall_clock() + 24 * 3600
        keys = {b"key-%d" % i: b"value-%d" % i for i in range(12)}
        for i, (key, value) in enumerate(keys.items()):
            await cl.nodes[i].store(key, value, exp)
        originals = list(cl.nodes)
        for victim in originals:  # replace every original node, one every 60 s
            await cl.kill(victim)
            await cl.add_node()
            await __import__("asyncio").sleep(60)
        found = 0
        for i, (key, value) in enumerate(keys.items()):
            if await cl.nodes[i].get(key) == value:
                found += 1
        await cl.close()
        return found, len(keys)

    return run_virtual(scenario())


@pytest.mark.slow
def test_churn_keeps_data_with_republishing_and_loses_it_without():
    found, total = _churn_run(republish_interval_s=300.0)
    assert found == total
    lost_found, _ = _churn_run(republish_interval_s=1e9)
    assert lost_found < total // 2
