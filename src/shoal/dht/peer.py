"""``DHT``: a DHT node served on a ``NetRuntime``, for code on the loop and on other threads.

On the network loop, ``await dht.node.store(...)`` / ``get(...)``. From the compute thread,
the blocking wrappers (``store``, ``get``, ``get_records``, ``bootstrap``) run the same
coroutines on the loop through ``runtime.run`` with an explicit deadline and raise
``PeerTimeout`` when it passes. ``close()`` stops the node and its service; safe twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

from shoal.dht.bootstrap import BOOTSTRAP_RETRY
from shoal.dht.config import DHTConfig
from shoal.dht.grpc_transport import DHTService, GrpcTransport
from shoal.dht.node import DHTNode
from shoal.dht.record import Record
from shoal.net import NetRuntime
from shoal.net.config import RetryPolicy
from shoal.net.proto.v1 import dht_pb2_grpc as rpc

__all__ = ["DHT"]

_SERVICE = "shoal.v1.DHT"


class DHT:
    """One DHT node on a started ``NetRuntime``; ``serve=False`` makes a client-only node."""

    def __init__(
        self, runtime: NetRuntime, config: DHTConfig | None = None, *, serve: bool = True
    ) -> None:
        self.runtime = runtime
        self.config = config or DHTConfig()
        address = runtime.address if serve else None
        transport = GrpcTransport(runtime, address, self.config.limits)
        self.node = DHTNode(
            runtime.identity, transport, address=address, config=self.config, wall_clock=time.time
        )
        self._serving = serve
        self._closed = False
        if serve:
            runtime.add_servicer(
                rpc.add_DHTServicer_to_server, DHTService(self.node, self.config.limits)
            )
        runtime.run(self._start(), timeout_s=5.0)

    async def _start(self) -> None:
        self.node.start()

    # Blocking wrappers for threads other than the network loop.
    def bootstrap(self, addresses: Sequence[str], policy: RetryPolicy | None = None) -> int:
        policy = policy or BOOTSTRAP_RETRY
        budget = policy.deadline_s + self.config.lookup_timeout_s + 1.0
        n: int = self.runtime.run(self.node.bootstrap(addresses, policy), timeout_s=budget)
        return n

    def store(
        self,
        key: bytes,
        value: bytes,
        expires_at: float,
        subkey: bytes | None = None,
        *,
        timeout_s: float | None = None,
    ) -> int:
        budget = timeout_s or 2 * self.config.lookup_timeout_s + 1.0
        n: int = self.runtime.run(self.node.store(key, value, expires_at, subkey), timeout_s=budget)
        return n

    def get(
        self, key: bytes, *, timeout_s: float | None = None
    ) -> bytes | dict[bytes, bytes] | None:
        budget = timeout_s or self.config.lookup_timeout_s + 1.0
        value: bytes | dict[bytes, bytes] | None = self.runtime.run(
            self.node.get(key), timeout_s=budget
        )
        return value

    def get_records(self, key: bytes, *, timeout_s: float | None = None) -> list[Record]:
        budget = timeout_s or self.config.lookup_timeout_s + 1.0
        records: list[Record] = self.runtime.run(self.node.get_records(key), timeout_s=budget)
        return records

    def close(self) -> None:
        """Stop maintenance and stop serving; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._serving:
            self.runtime.remove_service(_SERVICE)
        if not self.runtime.loop.is_closed():
            # RuntimeError: the runtime already shut down and its loop cancelled our tasks.
            with contextlib.suppress(RuntimeError, asyncio.CancelledError):
                self.runtime.run(self.node.close(), timeout_s=3.0)
