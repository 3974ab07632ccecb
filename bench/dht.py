"""DHT benchmark: lookup success, hops and latency under churn, and memory per node.

``shoal bench dht --nodes 256 --churn 0.25 --json`` simulates the swarm on the in-memory
transport and a virtual clock (latency is simulated, so ``p50_ms`` is simulated time; wall
time is reported separately). Phases, all in one run:

1. join ``nodes`` nodes (in concurrent batches), store ``keys`` records from random nodes;
2. baseline: ``gets`` lookups with no churn yet (``baseline_success_rate``);
3. churn: over ``churn_s`` simulated seconds, replace ``churn * nodes`` nodes at an even
   pace (silent death + a fresh node joining concurrently) while maintenance and
   republishing run;
4. measured: ``gets`` lookups of random keys from random live nodes (``success_rate``),
   plus the oracle: the fraction of keys that some live node still holds, i.e. what an
   exhaustive search of every node would find (``oracle_available``).

Memory per node is the RSS growth while the nodes were built and joined, divided by nodes.

``--transport grpc`` runs ``nodes`` real nodes on loopback instead, each with its own
NetRuntime (own loop thread and gRPC server) in this process; the baseline is a bare
authenticated ``Peer.Ping`` between random pairs of the same runtimes, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time

from shoal.dht.config import DHTConfig
from shoal.dht.memory import MemoryNetwork, SimConfig
from shoal.dht.node import DHTNode
from shoal.dht.sim import SimCluster
from shoal.dht.virtual_loop import run_virtual

GET_QUORUM = 1
"""Gets end at the first answer with records (classic Kademlia FIND_VALUE)."""


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _log(msg: str) -> None:
    print(f"[bench dht] {msg}", file=sys.stderr, flush=True)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _measure_gets(
    cluster: SimCluster, keys: dict[bytes, bytes], count: int
) -> tuple[float, list[float], list[float]]:
    """Success rate, hop counts and simulated latencies (ms) of ``count`` gets."""
    loop = asyncio.get_running_loop()
    names = sorted(keys)
    hops: list[float] = []
    lat_ms: list[float] = []
    ok = 0

    async def one(i: int) -> None:
        nonlocal ok
        node = cluster.rng.choice(cluster.nodes)
        key = names[i % len(names)]
        t0 = loop.time()
        records, found = await node.find_records(key, quorum=GET_QUORUM)
        lat_ms.append((loop.time() - t0) * 1000)
        if any(r.value == keys[key] for r in records):
            ok += 1
            hops.append(float(found.value_hops or 0))

    for start in range(0, count, 32):
        await asyncio.gather(*(one(i) for i in range(start, min(count, start + 32))))
    return ok / max(count, 1), hops, lat_ms


async def _simulate(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    wall0 = time.perf_counter()
    config = DHTConfig(
        rpc_timeout_s=1.0,
        slow_rpc_s=0.25,  # about twice the simulated links' slowest round trip
        lookup_timeout_s=10.0,
        republish_interval_s=args.republish_s,
        maintenance_period_s=60.0,
    )
    network = MemoryNetwork(
        SimConfig(latency_s=args.latency_ms / 1000, jitter_s=args.latency_ms / 1000), seed=args.seed
    )
    cluster = SimCluster(network, config, seed=args.seed)
    gc.collect()
    rss0 = _rss_bytes()
    first = await cluster.add_node()
    batch = 32
    while len(cluster.nodes) < args.nodes:
        size = min(batch, args.nodes - len(cluster.nodes))
        await asyncio.gather(*(cluster.add_node() for _ in range(size)))
        if len(cluster.nodes) % 1000 < batch:
            _log(f"joined {len(cluster.nodes)} nodes, wall {time.perf_counter() - wall0:.1f}s")
    gc.collect()
    mem_per_node_kb = (_rss_bytes() - rss0) / args.nodes / 1024
    del first
    _log(f"join done: sim {loop.time():.0f}s, wall {time.perf_counter() - wall0:.1f}s")

    keys: dict[bytes, bytes] = {}
    expires_at = cluster.wall_clock() + 4 * args.churn_s + 3600
    stores: list[int] = []
    for i in range(args.keys):
        key, value = f"bench-key-{i}".encode(), f"value-{i}".encode() * 4
        writer: DHTNode = cluster.rng.choice(cluster.nodes)
        stores.append(await writer.store(key, value, expires_at))
        keys[key] = value
    baseline, base_hops, base_ms = await _measure_gets(cluster, keys, args.gets)
    _log(f"stored {len(keys)} keys (min replicas {min(stores)}); baseline success {baseline:.4f}")

    replaced = round(args.churn * args.nodes)
    step_s = args.churn_s / max(replaced, 1)
    joins: set[asyncio.Task[DHTNode]] = set()
    for i in range(replaced):  # newcomers join concurrently, as independent peers would
        await asyncio.sleep(step_s)
        await cluster.kill(cluster.rng.choice(cluster.nodes))
        task = asyncio.ensure_future(cluster.add_node())
        joins.add(task)
        task.add_done_callback(joins.discard)
        if (i + 1) % 500 == 0:
            _log(f"replaced {i + 1}/{replaced}, wall {time.perf_counter() - wall0:.1f}s")
    if joins:
        await asyncio.gather(*joins)
    await asyncio.sleep(config.maintenance_period_s)
    now = cluster.wall_clock()
    held = {r.key for n in cluster.nodes for r in n.storage.records() if r.expires_at > now}
    oracle = sum(k in held for k in keys) / len(keys)
    success, hops, lat_ms = await _measure_gets(cluster, keys, args.gets)
    _log(f"after churn: success {success:.4f}, oracle {oracle:.4f}")
    result: dict[str, object] = {
        "bench": "dht",
        "transport": "memory",
        "nodes": args.nodes,
        "churn": args.churn,
        "success_rate": round(success, 4),
        "p50_hops": statistics.median(hops) if hops else None,
        "p50_ms": round(_quantile(lat_ms, 0.5), 1),
        "p95_ms": round(_quantile(lat_ms, 0.95), 1),
        "mem_per_node_kb": round(mem_per_node_kb, 1),
        "baseline_success_rate": round(baseline, 4),
        "baseline_p50_hops": statistics.median(base_hops) if base_hops else None,
        "baseline_p50_ms": round(_quantile(base_ms, 0.5), 1),
        "oracle_available": round(oracle, 4),
        "keys": len(keys),
        "gets": args.gets,
        "get_quorum": GET_QUORUM,
        "replaced": replaced,
        "one_way_latency_ms": f"{args.latency_ms}-{2 * args.latency_ms}",
        "rpcs": network.rpcs,
        "rpcs_by_method": dict(network.calls),
        "sim_s": round(loop.time(), 1),
        "wall_s": round(time.perf_counter() - wall0, 1),
    }
    await cluster.close()
    return result


def _grpc_bench(args: argparse.Namespace) -> dict[str, object]:
    import random

    from shoal.dht.peer import DHT
    from shoal.net import Identity, NetConfig, NetRuntime
    from shoal.net.proto.v1 import peer_pb2, peer_pb2_grpc

    wall0 = time.perf_counter()
    rng = random.Random(args.seed)
    config = DHTConfig(rpc_timeout_s=2.0, lookup_timeout_s=10.0)
    runtimes = [
        NetRuntime(Identity.generate(), NetConfig(port=0, unix_socket=False)).start()
        for _ in range(args.nodes)
    ]
    dhts: list[DHT] = []
    try:
        dhts = [DHT(rt, config) for rt in runtimes]
        for d in dhts[1:]:
            d.bootstrap([runtimes[rng.randrange(len(dhts))].address, runtimes[0].address])
        for d in dhts:  # a second pass fills tables the way maintenance would
            d.runtime.run(d.node.lookup(d.node.table.own_id), timeout_s=15)
        _log(f"{args.nodes} gRPC nodes up, wall {time.perf_counter() - wall0:.1f}s")
        keys = {f"grpc-key-{i}".encode(): f"value-{i}".encode() for i in range(args.keys)}
        replicas = [rng.choice(dhts).store(k, v, time.time() + 600) for k, v in keys.items()]
        names = sorted(keys)
        lat_ms: list[float] = []
        ok = 0
        for i in range(args.gets):
            d, key = rng.choice(dhts), names[i % len(names)]
            t0 = time.perf_counter()
            try:
                got = d.get(key)
            except Exception as exc:  # counted as a failure, reported on stderr
                _log(f"get failed: {exc!r}")
                got = None
            lat_ms.append((time.perf_counter() - t0) * 1000)
            ok += got == keys[key]
        ping_ms: list[float] = []
        for _ in range(args.gets):
            a, b = rng.sample(runtimes, 2)
            stub = a.stub(peer_pb2_grpc.PeerStub, b.address, b.peer_id)
            t0 = time.perf_counter()
            a.run(stub.Ping(peer_pb2.PingRequest(payload=b""), timeout_s=5.0), timeout_s=6.0)
            ping_ms.append((time.perf_counter() - t0) * 1000)
    finally:
        for d in dhts:
            d.close()
        for rt in runtimes:
            rt.close()
    return {
        "bench": "dht",
        "transport": "grpc",
        "nodes": args.nodes,
        "success_rate": round(ok / args.gets, 4),
        "p50_ms": round(_quantile(lat_ms, 0.5), 2),
        "p95_ms": round(_quantile(lat_ms, 0.95), 2),
        "min_replicas": min(replicas),
        "baseline_ping_p50_ms": round(_quantile(ping_ms, 0.5), 2),
        "baseline_ping_p95_ms": round(_quantile(ping_ms, 0.95), 2),
        "keys": len(keys),
        "gets": args.gets,
        "wall_s": round(time.perf_counter() - wall0, 1),
    }


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="shoal bench dht", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=256)
    p.add_argument("--churn", type=float, default=0.25, help="fraction of nodes replaced")
    p.add_argument("--keys", type=int, default=100)
    p.add_argument("--gets", type=int, default=1000)
    p.add_argument("--churn-s", type=float, default=1800.0, help="simulated churn duration")
    p.add_argument("--republish-s", type=float, default=600.0)
    p.add_argument("--latency-ms", type=float, default=25.0, help="base one-way latency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--transport", choices=("memory", "grpc"), default="memory")
    p.add_argument("--json", action="store_true", help="accepted for symmetry; output is JSON")
    args = p.parse_args(argv)
    if args.nodes < 2 or not 0 <= args.churn < 1 or args.keys < 1 or args.gets < 1:
        p.error("need --nodes >= 2, 0 <= --churn < 1, --keys >= 1, --gets >= 1")
    return args


def main(argv: list[str]) -> dict[str, object]:
    args = _parse(argv)
    if args.transport == "grpc":
        return _grpc_bench(args)
    return run_virtual(_simulate(args))


if __name__ == "__main__":
    import json

    print(json.dumps(main(sys.argv[1:])))
