"""The swarm view over the real DHT protocol (in-memory network): every peer publishes its
summary under the swarm key with its own subkey; an observer that serves nothing assembles
the picture, and a record another peer forges under someone else's subkey is not accepted."""

from __future__ import annotations

import asyncio
import time

from shoal.dht.config import DHTConfig
from shoal.dht.memory import MemoryNetwork, SimConfig
from shoal.dht.sim import SimCluster
from shoal.monitor.config import DashboardConfig, MonitorConfig, SwarmViewConfig
from shoal.monitor.dashboard import Dashboard
from shoal.monitor.peer import PeerMonitor
from shoal.monitor.publish import DhtSummaryStore, SummaryPublisher
from shoal.monitor.sources import StoreSource
from shoal.monitor.summary import PeerSummary

VIEW = SwarmViewConfig(publish_interval_s=0.05, publish_timeout_s=5.0, record_ttl_s=60.0)


async def _scenario() -> None:
    loop = asyncio.get_running_loop()
    net = MemoryNetwork(SimConfig(latency_s=0.001, jitter_s=0.0, serialize=True), seed=1)
    cluster = SimCluster(
        net,
        DHTConfig(k=8, rpc_timeout_s=1.0, lookup_timeout_s=5.0),
        epoch_s=time.time() - loop.time(),
        maintenance=False,
    )
    monitors, publishers = [], []
    try:
        for _ in range(5):
            await cluster.add_node()
        for i, node in enumerate(cluster.nodes):
            peer = str(node.identity.peer_id)
            monitor = PeerMonitor(MonitorConfig(swarm_view=VIEW), peer=peer)
            monitor.set_role("trainer")
            monitor.set_reachability("direct")
            monitor.record_progress(10 + i, loss=3.0 - 0.1 * i, samples=32)
            store = DhtSummaryStore(node, config=VIEW)
            publishers.append(SummaryPublisher(monitor.snapshot, store.publish, VIEW))
            monitors.append(monitor)
        for p in publishers:
            p.start()
            assert await p.publish_once()

        # A peer publishes a (newer) summary in another peer's name: it can only land under
        # its own subkey, so the observer refuses it.
        forger = DhtSummaryStore(cluster.nodes[4], config=VIEW, subkey=b"x")
        victim = str(cluster.nodes[0].identity.peer_id)
        await forger.publish(PeerSummary(peer=victim, t=time.time() + 1, step=999))

        observer = await cluster.add_node(serve=False)
        source = StoreSource(DhtSummaryStore(observer, config=VIEW))
        dash = Dashboard(source, DashboardConfig(port=0, swarm_view=VIEW))
        deadline = loop.time() + 10
        while len(dash.view.peers) < 5 and loop.time() < deadline:
            await dash.poll_once()
        peers = dash.view.by_peer()
        assert sorted(peers) == sorted(m.peer for m in monitors)
        assert peers[victim].step == 10  # the genuine summary, not the forged one
        assert {s.step for s in peers.values()} == {10, 11, 12, 13, 14}
        assert all(s.reachability == "direct" for s in peers.values())
        await dash.aclose()
    finally:
        for p in publishers:
            await p.aclose()
        for m in monitors:
            m.close()
        await cluster.close()


def test_summaries_round_trip_through_the_dht():
    asyncio.run(asyncio.wait_for(_scenario(), 60))
