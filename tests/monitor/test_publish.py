import asyncio
import random
from types import SimpleNamespace

import pytest

from shoal.errors import PeerTimeout
from shoal.monitor.config import SwarmViewConfig
from shoal.monitor.publish import (
    DhtSummaryStore,
    MemorySummaryStore,
    SummaryPublisher,
    monitor_keys,
    shard_of,
)
from shoal.monitor.summary import PeerSummary, encode_summary

from .fakes import FakeClock, peer_id

CFG = SwarmViewConfig(publish_interval_s=0.01, publish_timeout_s=0.2, record_ttl_s=60.0)


class FakeDht:
    """Stores per (key, subkey); ``get`` answers in one of the shapes a DHT may use."""

    def __init__(self, shape: str) -> None:
        self.shape = shape
        self.records: dict[str, dict[object, tuple[bytes, float]]] = {}

    async def store(self, key, value, expires_at, subkey=None):
        self.records.setdefault(key, {})[subkey] = (value, expires_at)
        return True

    async def get(self, key):
        entries = self.records.get(key)
        if entries is None:
            return None
        if self.shape == "mapping":
            return {sk: v for sk, (v, _) in entries.items()}
        if self.shape == "records":
            return [SimpleNamespace(value=v, expires_at=e) for v, e in entries.values()]
        return SimpleNamespace(
            value={sk: SimpleNamespace(value=v) for sk, (v, _) in entries.items()}
        )


def test_dht_store_writes_own_subkey_and_reads_everyone_skipping_garbage():
    async def main(shape: str) -> None:
        dht = FakeDht(shape)
        clock = FakeClock(5_000.0)
        stores = [
            DhtSummaryStore(
                dht, subkey=peer_id(i).encode(), config=CFG, wall_clock=clock, bind_owner=False
            )
            for i in range(3)
        ]
        for i, store in enumerate(stores):
            await store.publish(PeerSummary(peer=peer_id(i), t=clock(), step=i))
        keys = monitor_keys(CFG)
        assert keys[0] == b"shoal/v1/swarm/default/monitor/0" and len(keys) == CFG.shards
        await dht.store(keys[1], b"\xc1garbage", 0.0, subkey=b"evil")
        own_key = keys[shard_of(peer_id(0), CFG.shards)]
        assert dht.records[own_key][peer_id(0).encode()][1] == 5_060.0
        fetched = await stores[0].fetch()
        assert sorted((s.peer, s.step) for s in fetched) == [(peer_id(i), i) for i in range(3)]
        assert await DhtSummaryStore(FakeDht(shape), subkey=b"x", config=CFG).fetch() == []

    for shape in ("mapping", "records", "record"):
        asyncio.run(main(shape))


def test_publisher_publishes_periodically_counts_failures_and_closes():
    async def main() -> None:
        store = MemorySummaryStore()
        calls = 0
        done = asyncio.Event()

        async def flaky_publish(summary: PeerSummary) -> None:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise PeerTimeout("dht store timed out")
            if calls == 3:
                await asyncio.sleep(10)  # exceeds publish_timeout_s
            await store.publish(summary)
            if calls >= 5:
                done.set()

        step = 0

        def make() -> PeerSummary:
            nonlocal step
            step += 1
            return PeerSummary(peer="shme", t=float(step), step=step)

        publisher = SummaryPublisher(make, flaky_publish, CFG, rng=random.Random(1))
        async with publisher:
            await asyncio.wait_for(done.wait(), 10)
        assert publisher.failed == 2
        assert publisher.published >= 3
        [latest] = await store.fetch()
        assert latest.step >= 5
        await publisher.aclose()  # idempotent

    asyncio.run(main())


def test_memory_store_round_trips_through_the_wire_form():
    async def main() -> None:
        store = MemorySummaryStore()
        s = PeerSummary(peer="shme", t=1.0, loss=2.0)
        await store.publish(s)
        assert store.records["shme"] == encode_summary(s)
        assert await store.fetch() == [s]

    asyncio.run(main())


def test_summaries_spread_over_shards_and_a_dead_shard_does_not_blind_the_view():
    cfg = SwarmViewConfig(shards=4)
    peers = [f"sh{i:03d}" for i in range(40)]
    assert len({shard_of(p, 4) for p in peers}) == 4

    class HalfDeadDht(FakeDht):
        async def get(self, key):
            if key.endswith(b"/0"):
                raise PeerTimeout("lookup timed out")
            return await super().get(key)

    class DeadDht(FakeDht):
        async def get(self, key):
            raise PeerTimeout("lookup timed out")

    async def main() -> None:
        dht = HalfDeadDht("mapping")
        for p in peers:
            store = DhtSummaryStore(dht, subkey=p.encode(), config=cfg, bind_owner=False)
            await store.publish(PeerSummary(peer=p, t=1.0))
        fetched = await DhtSummaryStore(dht, config=cfg, bind_owner=False).fetch()
        expected = sorted(p for p in peers if shard_of(p, 4) != 0)
        assert sorted(s.peer for s in fetched) == expected
        with pytest.raises(PeerTimeout):
            await DhtSummaryStore(DeadDht("mapping"), config=cfg).fetch()

    asyncio.run(main())
