"""One contract suite over every DHT transport: in-memory (virtual clock) and gRPC loopback.

Each case is a coroutine ``case(nodes, on)``: ``nodes`` are joined DHT nodes and
``await on(node, coro)`` runs ``coro`` on the loop that owns ``node``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

from shoal.dht.config import DHTConfig
from shoal.dht.node import DHTNode
from shoal.dht.record import Record, Rejection, sign_record
from shoal.dht.virtual_loop import run_virtual
from shoal.errors import NetworkError
from shoal.net.identity import Identity

from .conftest import grow, make_cluster

On = Callable[[DHTNode, Coroutine[Any, Any, Any]], Awaitable[Any]]


async def case_store_get_and_dictionary(nodes: list[DHTNode], on: On) -> None:
    now = nodes[0].wall_clock()
    assert await on(nodes[0], nodes[0].store(b"c-plain", b"v1", now + 300)) >= 1
    assert await on(nodes[-1], nodes[-1].get(b"c-plain")) == b"v1"
    await on(nodes[1], nodes[1].store(b"c-dict", b"a", now + 300, subkey=b""))
    await on(nodes[2], nodes[2].store(b"c-dict", b"b", now + 300, subkey=b""))
    got = await on(nodes[-1], nodes[-1].get(b"c-dict"))
    assert got == {nodes[1].identity.peer_id.raw: b"a", nodes[2].identity.peer_id.raw: b"b"}


async def case_forged_and_foreign_subkey_refused_over_the_wire(
    nodes: list[DHTNode], on: On
) -> None:
    writer, sender, holder = nodes[0], nodes[1], nodes[2]
    now = writer.wall_clock()
    honest = sign_record(writer.identity, b"c-forge", b"honest", now + 300)
    forged = Record(honest.key, b"", b"evil", honest.expires_at, honest.writer, honest.signature)
    mallory = Identity.from_seed(b"mallory")
    foreign = sign_record(mallory, b"c-forge", b"x", now + 300, subkey=writer.identity.peer_id.raw)
    expired = sign_record(mallory, b"c-forge", b"x", now - 1)
    assert holder.contact is not None
    answer = await on(
        sender,
        sender.transport.store(holder.contact, [forged, foreign, expired, honest], timeout_s=5),
    )
    assert answer.results == [
        Rejection.BAD_SIGNATURE,
        Rejection.NOT_SUBKEY_OWNER,
        Rejection.EXPIRED,
        None,
    ]
    assert await on(nodes[-1], nodes[-1].get(b"c-forge")) == b"honest"


async def case_dead_address_fails_within_deadline(nodes: list[DHTNode], on: On, dead: str) -> None:
    async def probe() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(NetworkError):
            await nodes[0].transport.ping_address(dead, timeout_s=1.0)
        return loop.time() - t0

    assert await on(nodes[0], probe()) <= 1.5


def test_contract_over_memory_transport():
    async def scenario() -> None:
        cl = make_cluster(seed=11)
        await grow(cl, 12)

        async def on(node: DHTNode, coro: Coroutine[Any, Any, Any]) -> Any:
            return await coro

        await case_store_get_and_dictionary(cl.nodes, on)
        await case_forged_and_foreign_subkey_refused_over_the_wire(cl.nodes, on)
        await case_dead_address_fails_within_deadline(cl.nodes, on, "sim:nobody")
        await cl.close()

    run_virtual(scenario())


@pytest.mark.slow
def test_contract_over_grpc_loopback():
    from shoal.dht.peer import DHT
    from shoal.net import NetConfig, NetRuntime

    runtimes = [
        NetRuntime(Identity.generate(), NetConfig(port=0, unix_socket=False)).start()
        for _ in range(5)
    ]
    dhts: list[DHT] = []
    try:
        cfg = DHTConfig(k=4, rpc_timeout_s=3.0, lookup_timeout_s=8.0)
        dhts = [DHT(rt, cfg) for rt in runtimes]
        for d in dhts[1:]:
            assert d.bootstrap(["127.0.0.1:1", runtimes[0].address]) >= 1
        owner = {id(d.node): d.runtime for d in dhts}

        async def on(node: DHTNode, coro: Coroutine[Any, Any, Any]) -> Any:
            return await asyncio.wrap_future(owner[id(node)].submit(coro))

        async def all_cases() -> None:
            nodes = [d.node for d in dhts]
            await case_store_get_and_dictionary(nodes, on)
            await case_forged_and_foreign_subkey_refused_over_the_wire(nodes, on)
            await case_dead_address_fails_within_deadline(nodes, on, "127.0.0.1:1")

        t0 = time.monotonic()
        asyncio.run(asyncio.wait_for(all_cases(), 120))
        assert time.monotonic() - t0 < 120
    finally:
        for d in dhts:
            d.close()
        for rt in runtimes:
            rt.close()
