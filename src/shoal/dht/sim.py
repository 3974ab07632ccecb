"""A simulated swarm of DHT nodes on one ``MemoryNetwork`` (tests and ``bench/dht.py``).

Run it on a ``VirtualClockLoop``: the wall clock of every node is ``epoch_s + loop.time()``,
so record expiry, republishing and deadlines all follow simulated time. Identities come
from seeds, so a run is reproducible for a given seed.
"""

from __future__ import annotations

import asyncio
import random

from shoal.dht.config import DHTConfig
from shoal.dht.memory import MemoryNetwork
from shoal.dht.node import DHTNode
from shoal.net.config import RetryPolicy
from shoal.net.identity import Identity

__all__ = ["SimCluster"]


class SimCluster:
    """Creates, joins and kills simulated nodes."""

    def __init__(
        self,
        network: MemoryNetwork,
        config: DHTConfig,
        *,
        seed: int = 0,
        epoch_s: float = 1.8e9,
        maintenance: bool = True,
    ) -> None:
        self.network = network
        self.config = config
        self.rng = random.Random(seed)
        self.epoch_s = epoch_s
        self.maintenance = maintenance
        self.nodes: list[DHTNode] = []
        self._serial = 0
        self._seed = seed

    def wall_clock(self) -> float:
        return self.epoch_s + asyncio.get_running_loop().time()

    def make_node(self, *, serve: bool = True) -> DHTNode:
        self._serial += 1
        identity = Identity.from_seed(f"sim-{self._seed}-{self._serial}".encode())
        address = f"sim:{self._serial}" if serve else None
        node = DHTNode(
            identity,
            self.network.transport(None),
            address=address,
            config=self.config,
            wall_clock=self.wall_clock,
            rng=random.Random(self.rng.getrandbits(64)),
        )
        node.transport = self.network.transport(node.contact)
        if node.contact is not None:
            self.network.listen(node.contact, node)
        return node

    async def add_node(self, *, join_via: int = 2, serve: bool = True) -> DHTNode:
        """A new node that bootstraps through ``join_via`` random live nodes."""
        node = self.make_node(serve=serve)
        if self.nodes:
            seeds = self.rng.sample(self.nodes, min(join_via, len(self.nodes)))
            addresses = [s.contact.address for s in seeds if s.contact is not None]
            await node.bootstrap(addresses, RetryPolicy(attempts=2, initial_s=0.1))
        if self.maintenance:
            node.start()
        if serve:
            self.nodes.append(node)
        return node

    async def kill(self, node: DHTNode) -> None:
        """The node disappears without a word (calls to it time out)."""
        if node.contact is not None:
            self.network.unlisten(node.contact.address)
        if node in self.nodes:
            self.nodes.remove(node)
        await node.close()

    async def close(self) -> None:
        for node in list(self.nodes):
            await self.kill(node)
