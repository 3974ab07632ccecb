"""The all-reduce over real gRPC runtimes (three peers in this process, each with its own
network loop): same invariant as the in-memory suite, plus wire codecs and a dead peer."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from shoal.net.config import NetConfig
from shoal.net.identity import Identity
from shoal.net.runtime import NetRuntime
from shoal.parallel.data.allreduce import AllReduceConfig
from shoal.parallel.data.averager import Averager, GroupSpec
from shoal.parallel.data.buffers import BufferPool
from shoal.parallel.data.grpc_transport import MAX_BANDWIDTH_BPS, MIN_BANDWIDTH_BPS, GrpcTransport
from shoal.parallel.data.messages import Contribution, Leave

N = 3
NUMEL = 70_001


@pytest.fixture
def peers():
    runtimes = [
        NetRuntime(Identity.generate(), NetConfig(port=0, unix_socket=False)).start()
        for _ in range(N)
    ]
    transports = [GrpcTransport(rt) for rt in runtimes]
    for t in transports:
        for rt in runtimes:
            t.set_address(rt.peer_id, rt.address)
    yield runtimes, transports
    for rt in runtimes:
        rt.close()


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(NUMEL, generator=g) * (i + 1) for i in range(N)]


def _run(runtimes, transports, round_id, inputs, codec, alive, timeout_s):
    members = tuple(rt.peer_id for rt in runtimes)
    group = GroupSpec.uniform(round_id, members)
    config = AllReduceConfig()
    tensors = [x.clone() for x in inputs]
    futures = {
        i: runtimes[i].submit(
            Averager(transports[i], wire_codec=codec, config=config).average(
                [tensors[i]], float(i + 1), group=group, timeout_s=timeout_s
            )
        )
        for i in alive
    }
    results = {i: f.result(timeout_s + 5) for i, f in futures.items()}
    return members, results, tensors


@pytest.mark.parametrize(
    "codec,atol",
    [("none", 1e-5), ("fp16", 2e-2), ("int8", 0.15), ("int4", 1.5), ("sparse", 1e-5)],
)
def test_grpc_round_gives_the_weighted_mean_of_the_reported_contributors(peers, codec, atol):
    runtimes, transports = peers
    inputs = _inputs(1)
    if codec == "sparse":  # (position, value) pairs out, results dense where they fill up
        for i, x in enumerate(inputs):
            x[torch.arange(NUMEL) % 8 != i] = 0.0
    members, results, tensors = _run(runtimes, transports, b"g1", inputs, codec, range(N), 20.0)
    for i, r in results.items():
        assert r.ok, r.reason
        assert r.contributors == frozenset(members)
        expect = sum(inputs[j].double() * (j + 1) for j in range(N)) / sum(range(1, N + 1))
        assert torch.allclose(tensors[i].double(), expect, atol=atol, rtol=0)
    assert torch.equal(tensors[0], tensors[1]) and torch.equal(tensors[1], tensors[2])


def test_grpc_round_without_one_peer_averages_the_others(peers):
    runtimes, transports = peers
    inputs = _inputs(2)
    runtimes[2].close()  # gone before the round: its part is reassigned
    members, results, tensors = _run(runtimes, transports, b"g2", inputs, "none", [0, 1], 2.0)
    for i, r in results.items():
        assert r.ok, r.reason
        assert r.contributors == frozenset(members[:2])
        expect = (inputs[0].double() * 1 + inputs[1].double() * 2) / 3
        assert torch.allclose(tensors[i].double(), expect, atol=1e-5, rtol=0)


def test_a_peer_the_others_cannot_dial_is_left_out_not_the_round(peers):
    # Peer 2 reaches everyone, but the others know it at a refused address (as a peer
    # restarted within its address ban, or one behind a NAT not in client mode): its part
    # is reassigned and the others average without it.
    import socket

    runtimes, transports = peers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{s.getsockname()[1]}"
    for t in transports[:2]:
        t.set_address(runtimes[2].peer_id, refused)
    inputs = _inputs(3)
    members, results, tensors = _run(runtimes, transports, b"g3", inputs, "none", range(N), 4.0)
    for i in (0, 1):
        r = results[i]
        assert r.ok, r.reason
        assert r.contributors == frozenset(members[:2])
        assert r.reassigned == {2: members[0]}
        assert "cut off" in r.excluded[members[2]]
        expect = (inputs[0].double() * 1 + inputs[1].double() * 2) / 3
        assert torch.allclose(tensors[i].double(), expect, atol=1e-5, rtol=0)
    # Peer 2 heard from no one: alone at best, never a mix.
    assert not results[2].ok or results[2].contributors == frozenset(members[2:])


def test_buffer_pool_reuses_only_buffers_nobody_views():
    pool = BufferPool(min_pooled_bytes=1)
    t = pool.tensor(1000)
    again = pool.tensor(1000)
    assert t.data_ptr() != again.data_ptr()  # t still alive: not handed out twice
    ptr = t.data_ptr()
    del t
    assert pool.tensor(1000).data_ptr() == ptr
    assert pool.reused == 1


def test_a_matchmaking_group_becomes_an_all_reduce_group(peers):
    from shoal.parallel.data.matchmaking import ReadyPeer, form_groups

    runtimes, transports = peers
    ready = [
        ReadyPeer(rt.peer_id.raw, 1.0, 1e8 * (i + 1), i == 2, rt.address, downlink_bps=d)
        for (i, rt), d in zip(enumerate(runtimes), (0.0, 1.0, 1e12), strict=True)
    ]
    (group,) = form_groups(b"k", ready, max_group_size=8)
    spec = transports[0].join(group)
    assert set(spec.members) == {rt.peer_id for rt in runtimes}
    links = zip(spec.uplinks_bps, spec.downlinks_bps, spec.client_mode, strict=True)
    by_peer = dict(zip(spec.members, links, strict=True))
    # a downlink not measured stays 0 (taken as the uplink); others are clamped
    assert by_peer[runtimes[0].peer_id] == (1e8, 0.0, False)
    assert by_peer[runtimes[1].peer_id] == (2e8, MIN_BANDWIDTH_BPS, False)
    assert by_peer[runtimes[2].peer_id] == (3e8, MAX_BANDWIDTH_BPS, True)
    assert transports[0].addresses[runtimes[1].peer_id] == runtimes[1].address
    assert spec.round_id == group.group_id


def test_one_transport_per_runtime_is_shared(peers):
    runtimes, transports = peers
    assert GrpcTransport.for_runtime(runtimes[0]) is transports[0]


def test_a_peer_stopping_mid_round_is_not_waited_for(peers):
    # Peer 2 starts first, sends its contributions and is then stopped (its round task
    # cancelled, as on SIGTERM): its leave message reaches the others over the wire, and
    # their round goes on without it at once instead of at the collect deadline (16.5 s).
    runtimes, transports = peers
    members = tuple(rt.peer_id for rt in runtimes)
    group = GroupSpec.uniform(b"g-leave", members)
    inputs = _inputs(4)
    tensors = [x.clone() for x in inputs]

    def average(i):
        return Averager(transports[i]).average(
            [tensors[i]], float(i + 1), group=group, timeout_s=30.0
        )

    def holds(i, kind):
        def predicate():
            msgs = transports[i].inbox.messages(group.round_id)
            return any(isinstance(m, kind) and m.sender == members[2] for m in msgs)

        async def wait():
            deadline = asyncio.get_running_loop().time() + 10.0
            return await transports[i].inbox.wait_until(predicate, deadline)

        return runtimes[i].run(wait(), timeout_s=15.0)

    stopping = runtimes[2].submit(average(2))
    assert holds(0, Contribution) and holds(1, Contribution)
    stopping.cancel()
    assert holds(0, Leave) and holds(1, Leave)
    start = time.monotonic()
    futures = [runtimes[i].submit(average(i)) for i in (0, 1)]
    results = [f.result(35.0) for f in futures]
    assert time.monotonic() - start < 8.0
    expect = (inputs[0].double() + 2 * inputs[1].double()) / 3
    for i, r in enumerate(results):
        assert r.ok, r.reason
        assert r.contributors == frozenset(members[:2])
        assert r.excluded[members[2]] == "left the round"
        assert torch.allclose(tensors[i].double(), expect, atol=1e-5, rtol=0)
    assert torch.equal(tensors[2], inputs[2])  # the stopped peer's tensors are untouched
