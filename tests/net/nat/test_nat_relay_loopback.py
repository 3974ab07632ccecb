"""Relayed links between three runtimes on 127.0.0.1: reservation, circuit, counters, limits."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch

from shoal.errors import NetworkError
from shoal.net import tensor_frames
from shoal.net.nat.limits import RelayConfig
from shoal.net.nat.reserve import RelayAddress, ReserverConfig
from shoal.net.nat.traversal import Traversal, TraversalConfig
from shoal.net.proto.v1 import peer_pb2, peer_pb2_grpc
from shoal.net.runtime import NetRuntime


def _nat(runtime: NetRuntime, **config: object) -> Traversal:
    nat = Traversal(runtime, TraversalConfig(**config))  # type: ignore[arg-type]
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
    assert relay.core.stats()["reservations"] == [target_rt.peer_id.to_string()]

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
    assert circuit["target"] == target_rt.peer_id.to_string()
    assert circuit["dialer"] == dialer_rt.peer_id.to_string()
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
