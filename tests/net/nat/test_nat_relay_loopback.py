"""Relayed links between three runtimes on 127.0.0.1: reservation, circuit, counters, limits."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading

import pytest
import torch

from shoal.errors import NetworkError
from shoal.net import tensor_frames
from shoal.net.nat.limits import RelayConfig
from shoal.net.nat.observe import ProbeResult, probe
from shoal.net.nat.punch import PunchResult
from shoal.net.nat.reachability import Reachability, Verdict
from shoal.net.nat.reserve import RelayAddress, ReserverConfig
from shoal.net.nat.routing import LinkKind
from shoal.net.nat.traversal import Traversal, TraversalConfig
from shoal.net.proto.v1 import peer_pb2, peer_pb2_grpc
from shoal.net.runtime import NetRuntime


class LoopbackPuncher:
    """Stands in for ``punch()`` on loopback: the two sides that name each other's port get
    the two ends of one TCP connection (simultaneous open itself is tested in tests/netns)."""

    def __init__(self) -> None:
        self._waiting: dict[frozenset[int], tuple[socket.socket, tuple[str, int]]] = {}
        self._lock = threading.Lock()
        self.calls = 0

    async def __call__(self, port: int, peer: tuple[str, int], config: object) -> PunchResult:
        self.calls += 1
        key = frozenset((port, peer[1]))
        with self._lock:
            held = self._waiting.pop(key, None)
            if held is None:
                listener = socket.create_server(("127.0.0.1", 0))
                a = socket.create_connection(listener.getsockname())
                b, _ = listener.accept()
                listener.close()
                self._waiting[key] = (b, ("127.0.0.1", port))
                sock = a
            else:
                sock = held[0]
        sock.setblocking(False)
        return PunchResult(sock=sock, attempts=1, local=("127.0.0.1", port), peer=peer)


def _nat(
    runtime: NetRuntime, puncher: LoopbackPuncher | None = None, **config: object
) -> Traversal:
    nat = Traversal(
        runtime,
        TraversalConfig(**config),  # type: ignore[arg-type]
        puncher=puncher or LoopbackPuncher(),
    )
    runtime.run(nat.start(), timeout_s=5)
    return nat


def _close(runtime: NetRuntime, nat: Traversal) -> None:
    runtime.run(nat.close(), timeout_s=5)


def test_relayed_calls_reach_the_target_and_are_counted(make_runtime) -> None:
    relay_rt, target_rt, dialer_rt = make_runtime(), make_runtime(), make_runtime()
    relay = _nat(relay_rt, relay=RelayConfig(rate_bytes_s=1e9, burst_bytes=1 << 22))
    target = _nat(target_rt)
    dialer = _nat(dialer_rt)
    where = RelayAddress(relay_rt.address, relay_rt.peer_id)

    async def reserve() -> list[RelayAddress]:
        return await target.reserve([where]).wait_held(1, timeout_s=5)

    assert target_rt.run(reserve(), timeout_s=10) == [where]
    assert relay.core is not None
    assert relay.core.stats()["reservations"] == [target_rt.peer_id.raw.hex()]

    async def call() -> tuple[bytes, int]:
        address = await dialer.address_for(target_rt.peer_id, direct=[], relays=[where])
        assert address.startswith("unix:")
        stub = dialer_rt.stub(peer_pb2_grpc.PeerStub, address, target_rt.peer_id)
        pong = await stub.Ping(peer_pb2.PingRequest(payload=b"over the relay"), timeout_s=10)
        ack = await stub.Absorb(
            itertools.chain(tensor_frames(torch.ones(1 << 18, dtype=torch.float32))),
            timeout_s=20,
        )
        return pong.payload, ack.byte_length

    payload, length = dialer_rt.run(call(), timeout_s=30)
    assert payload == b"over the relay" and length == 1 << 20
    stats = relay.core.stats()
    [circuit] = stats["circuits"]
    assert circuit["target"] == target_rt.peer_id.raw.hex()
    assert circuit["dialer"] == dialer_rt.peer_id.raw.hex()
    assert circuit["bytes_to_target"] > 1 << 20  # the tensor crossed the relay
    assert dialer.links[target_rt.peer_id.raw].kind is not None
    for runtime, nat in ((dialer_rt, dialer), (target_rt, target), (relay_rt, relay)):
        _close(runtime, nat)


def test_a_target_without_reservation_is_refused(make_runtime) -> None:
    relay_rt, dialer_rt, absent_rt = make_runtime(), make_runtime(), make_runtime()
    relay = _nat(relay_rt, relay=RelayConfig())
    dialer = _nat(dialer_rt, circuit_open_timeout_s=2.0)
    where = RelayAddress(relay_rt.address, relay_rt.peer_id)

    async def call() -> None:
        address = await dialer.address_for(absent_rt.peer_id, direct=[], relays=[where])
        stub = dialer_rt.stub(peer_pb2_grpc.PeerStub, address, absent_rt.peer_id)
        await stub.Ping(peer_pb2.PingRequest(), timeout_s=5)

    with pytest.raises(NetworkError):
        dialer_rt.run(call(), timeout_s=20)
    assert relay.core is not None and relay.core.refused >= 1
    _close(dialer_rt, dialer)
    _close(relay_rt, relay)


def test_reservations_move_to_the_next_relay_when_one_goes(make_runtime) -> None:
    first_rt, second_rt, target_rt = make_runtime(), make_runtime(), make_runtime()
    first = _nat(first_rt, relay=RelayConfig())
    second = _nat(second_rt, relay=RelayConfig())
    target = _nat(target_rt, reserver=ReserverConfig(retry_s=30.0))
    a = RelayAddress(first_rt.address, first_rt.peer_id)
    b = RelayAddress(second_rt.address, second_rt.peer_id)

    async def reserve() -> list[RelayAddress]:
        return await target.reserve([a, b]).wait_held(1, timeout_s=5)

    assert target_rt.run(reserve(), timeout_s=10) == [a]
    _close(first_rt, first)
    first_rt.close()

    async def moved() -> list[RelayAddress]:
        reserver = target.reserver
        assert reserver is not None
        reserver.changed.clear()
        while reserver.held() != [b]:
            reserver.changed.clear()
            await asyncio.wait_for(reserver.changed.wait(), 10)
        return reserver.held()

    assert target_rt.run(moved(), timeout_s=15) == [b]
    _close(target_rt, target)
    _close(second_rt, second)


def test_dial_back_from_two_helpers_says_public(make_runtime) -> None:
    me_rt, h1_rt, h2_rt = make_runtime(), make_runtime(), make_runtime()
    nats = [_nat(rt) for rt in (me_rt, h1_rt, h2_rt)]
    helpers = [RelayAddress(h1_rt.address, h1_rt.peer_id), RelayAddress(h2_rt.address, None)]

    async def check() -> Verdict:
        return await nats[0].check_reachability(helpers, [me_rt.address])

    verdict = me_rt.run(check(), timeout_s=20)
    assert verdict.status is Reachability.PUBLIC and verdict.reached == 2
    assert verdict.mapping == "none"  # loopback: helpers saw our own address and port

    async def unreachable() -> Verdict:
        return await nats[0].check_reachability(helpers, ["127.0.0.1:1"])

    verdict = me_rt.run(unreachable(), timeout_s=20)
    assert verdict.status is Reachability.PRIVATE and verdict.unreached == 2
    for rt, nat in zip((me_rt, h1_rt, h2_rt), nats, strict=True):
        _close(rt, nat)


def test_upgrade_moves_the_channel_off_the_relay(make_runtime) -> None:
    relay_rt, target_rt, dialer_rt = make_runtime(), make_runtime(), make_runtime()
    relay = _nat(relay_rt, relay=RelayConfig())
    puncher = LoopbackPuncher()
    target, dialer = _nat(target_rt, puncher), _nat(dialer_rt, puncher)
    where = RelayAddress(relay_rt.address, relay_rt.peer_id)

    async def reserve() -> list[RelayAddress]:
        return await target.reserve([where]).wait_held(1, timeout_s=5)

    target_rt.run(reserve(), timeout_s=10)

    async def go() -> tuple[bool, LinkKind | None]:
        address = await dialer.address_for(target_rt.peer_id, direct=[], relays=[where])
        stub = dialer_rt.stub(peer_pb2_grpc.PeerStub, address, target_rt.peer_id)
        await stub.Ping(peer_pb2.PingRequest(), timeout_s=10)
        punched = await dialer.upgrade(target_rt.peer_id)
        await stub.Ping(peer_pb2.PingRequest(), timeout_s=10)
        return punched, dialer.links[target_rt.peer_id.raw].kind

    assert dialer_rt.run(go(), timeout_s=30) == (True, LinkKind.PUNCHED)
    assert target.punched_in == 1 and puncher.calls == 2
    assert relay.core is not None
    assert [c["open"] for c in relay.core.stats()["circuits"]] == [False]
    before = relay.core.total_bytes

    async def bulk() -> int:
        address = dialer.links[target_rt.peer_id.raw].address
        stub = dialer_rt.stub(peer_pb2_grpc.PeerStub, address, target_rt.peer_id)
        ack = await stub.Absorb(tensor_frames(torch.ones(1 << 20)), timeout_s=20)
        return int(ack.byte_length)

    assert dialer_rt.run(bulk(), timeout_s=30) == 4 << 20
    assert relay.core.total_bytes == before
    for rt, nat in ((dialer_rt, dialer), (target_rt, target), (relay_rt, relay)):
        _close(rt, nat)


def test_dial_back_never_dials_another_host(make_runtime) -> None:
    me_rt, helper_rt = make_runtime(), make_runtime()
    helper = _nat(helper_rt)
    accepted: list[object] = []
    bystander = socket.create_server(("127.0.0.2", 0))
    bystander.setblocking(False)
    elsewhere = f"127.0.0.2:{bystander.getsockname()[1]}"

    async def ask() -> ProbeResult:
        return await probe(
            me_rt, helper_rt.address, helper_rt.peer_id, 0, (me_rt.address, elsewhere)
        )

    result = me_rt.run(ask(), timeout_s=20)
    assert result.reached == (me_rt.address,)  # ours was dialled, the bystander was not
    with contextlib.suppress(BlockingIOError):
        accepted.append(bystander.accept())
    assert accepted == []
    bystander.close()
    _close(helper_rt, helper)
