import asyncio

import pytest

from shoal.dht.config import DHTConfig
from shoal.dht.memory import MemoryNetwork, SimConfig
from shoal.dht.sim import SimCluster
from shoal.dht.virtual_loop import run_virtual
from shoal.swarm import Membership, PeerInfo, SwarmConfig

TTL = 30.0


@pytest.mark.slow
def test_members_see_each_other_and_a_silent_peer_leaves_within_two_ttls():
    async def scenario():
        net = MemoryNetwork(SimConfig(loss_rate=0.01, serialize=True), seed=2)
        cl = SimCluster(net, DHTConfig(k=8, rpc_timeout_s=1.0, lookup_timeout_s=4.0), seed=2)
        cfg = SwarmConfig(
            swarm="t", ttl_s=TTL, heartbeat_interval_s=10, refresh_interval_s=5, shards=2
        )
        members = []
        for i in range(12):
            node = await cl.add_node()
            m = Membership(
                node, cfg, lambda i=i: PeerInfo(roles=(f"r{i}",)), wall_clock=cl.wall_clock
            )
            m.start()
            members.append(m)
        loop = asyncio.get_running_loop()
        await asyncio.sleep(2 * TTL)
        everyone = {m.dht.identity.peer_id for m in members}
        for m in members:
            assert {p.peer_id for p in m.peers()} == everyone
        quiet = members[5]
        quiet.stop_heartbeats()
        t0 = loop.time()  # its last heartbeat was sent at most 10 s before this
        watchers = [m for m in members if m is not quiet]
        gone_after = None
        while loop.time() < t0 + 3 * TTL:
            await asyncio.sleep(1.0)
            seen = [quiet.dht.identity.peer_id in {p.peer_id for p in w.peers()} for w in watchers]
            if not any(seen) and gone_after is None:
                gone_after = loop.time() - t0
        assert gone_after is not None and gone_after <= 2 * TTL
        for w in watchers:
            assert {p.peer_id for p in w.peers()} == everyone - {quiet.dht.identity.peer_id}
        for m in members:
            await m.close()
        await cl.close()

    run_virtual(scenario())
