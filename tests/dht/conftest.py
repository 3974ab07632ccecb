"""Helpers for DHT tests: simulated swarms on a virtual clock."""

from __future__ import annotations

from shoal.dht.config import DHTConfig
from shoal.dht.memory import MemoryNetwork, SimConfig
from shoal.dht.sim import SimCluster


def make_cluster(
    *, seed: int = 0, loss: float = 0.0, maintenance: bool = False, **config: object
) -> SimCluster:
    cfg = DHTConfig(**{"k": 8, "rpc_timeout_s": 1.0, "lookup_timeout_s": 5.0, **config})
    net = MemoryNetwork(SimConfig(loss_rate=loss, serialize=True), seed=seed)
    return SimCluster(net, cfg, seed=seed, maintenance=maintenance)


async def grow(cluster: SimCluster, n: int) -> None:
    for _ in range(n):
        await cluster.add_node()
