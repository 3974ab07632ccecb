"""Real runtimes on loopback: calls, auth rejections, caller identity, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
import torch

from shoal.errors import AuthenticationError, ConfigError, PeerUnavailable, ProtocolViolation
from shoal.net.auth import AUTH_METADATA_KEY
from shoal.net.config import NetConfig
from shoal.net.identity import Identity
from shoal.net.peer_service import PeerService
from shoal.net.proto.v1 import peer_pb2, peer_pb2_grpc
from shoal.net.runtime import CLOSE_TIMEOUT_S, NetRuntime, State
from shoal.net.server import current_caller
from shoal.net.tensors import TensorReader, tensor_frames

PING = "/shoal.v1.Peer/Ping"


class CallerEcho(PeerService):
    """Peer service whose Ping answers with the caller's PeerID and counts handler runs."""

    runs = 0

    async def Ping(self, request, context):
        CallerEcho.runs += 1
        return peer_pb2.PingResponse(payload=current_caller().raw)


def _serve_echo(runtime):
    CallerEcho.runs = 0
    service = CallerEcho(
        runtime.identity, runtime.sessions, runtime.config, runtime.addresses, lambda: []
    )
    runtime.add_servicer(peer_pb2_grpc.add_PeerServicer_to_server, service)


async def _raw_ping(address: str, metadata=()) -> grpc.StatusCode:
    """A Ping through a bare channel (no Shoal client); returns the status code."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(
            PING,
            request_serializer=peer_pb2.PingRequest.SerializeToString,
            response_deserializer=peer_pb2.PingResponse.FromString,
        )
        try:
            await call(peer_pb2.PingRequest(), timeout=5, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


def test_ping_info_and_caller_identity(make_runtime):
    a, b, c = make_runtime(b"a"), make_runtime(b"b"), make_runtime(b"c")
    _serve_echo(b)
    for caller in (a, c):
        stub = caller.stub(peer_pb2_grpc.PeerStub, b.address)
        reply = caller.run(stub.Ping(peer_pb2.PingRequest()), timeout_s=5)
        assert reply.payload == caller.peer_id.raw
        assert stub.peer_id == b.peer_id
    info = a.run(a.stub(peer_pb2_grpc.PeerStub, b.address).Info(peer_pb2.InfoRequest()), 5)
    assert info.peer_id == b.peer_id.raw and b.address in info.addresses
    assert any(x.startswith("unix:") for x in info.addresses)


def test_unix_socket_serves_the_same_services(make_runtime):
    a, b = make_runtime(), make_runtime()
    stub = a.stub(peer_pb2_grpc.PeerStub, f"unix:{b.unix_path}", peer_id=b.peer_id)
    assert a.run(stub.Ping(peer_pb2.PingRequest(payload=b"u")), 5).payload == b"u"


def test_unauthenticated_wrong_key_and_replayed_calls_rejected(make_runtime):
    a, b = make_runtime(), make_runtime()
    _serve_echo(b)
    assert a.run(_raw_ping(b.address), 5) == grpc.StatusCode.UNAUTHENTICATED
    assert (
        a.run(_raw_ping(b.address, ((AUTH_METADATA_KEY, b"x" * 48),)), 5)
        == grpc.StatusCode.UNAUTHENTICATED
    )
    # a real session, then a token signed with the wrong key, then a replay of a good one
    stub = a.stub(peer_pb2_grpc.PeerStub, b.address)
    a.run(stub.Ping(peer_pb2.PingRequest()), 5)
    conn = next(iter(a.pool._conns.values()))
    good = conn.session.token(PING, time.time())
    real_key = conn.session.key
    conn.session.key = bytes(32)
    forged = conn.session.token(PING, time.time())
    conn.session.key = real_key
    assert (
        a.run(_raw_ping(b.address, ((AUTH_METADATA_KEY, forged),)), 5)
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert a.run(_raw_ping(b.address, ((AUTH_METADATA_KEY, good),)), 5) == grpc.StatusCode.OK
    assert (
        a.run(_raw_ping(b.address, ((AUTH_METADATA_KEY, good),)), 5)
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert CallerEcho.runs == 2  # the stub's call and the one good token; no rejected one


def test_wrong_swarm_key_and_wrong_peer_refused(make_runtime):
    a = make_runtime(swarm_key=b"k" * 32)
    b = make_runtime(swarm_key=b"other" * 8)
    c = make_runtime(swarm_key=b"k" * 32)
    with pytest.raises(AuthenticationError):
        a.run(a.stub(peer_pb2_grpc.PeerStub, b.address).Ping(peer_pb2.PingRequest()), 5)
    assert a.run(a.stub(peer_pb2_grpc.PeerStub, c.address).Ping(peer_pb2.PingRequest()), 5)
    with pytest.raises(AuthenticationError):
        a.run(
            a.stub(peer_pb2_grpc.PeerStub, c.address, peer_id=b.peer_id).Ping(
                peer_pb2.PingRequest()
            ),
            5,
        )


def test_handler_errors_map_to_shoal_errors(make_runtime):
    a, b = make_runtime(), make_runtime(max_ping_payload_bytes=16)
    stub = a.stub(peer_pb2_grpc.PeerStub, b.address)
    with pytest.raises(ProtocolViolation):
        a.run(stub.Ping(peer_pb2.PingRequest(payload=b"x" * 17)), 5)
    with pytest.raises(PeerUnavailable):
        a.run(a.stub(peer_pb2_grpc.PeerStub, "127.0.0.1:1").Ping(peer_pb2.PingRequest()), 5)


def test_tensor_streams_both_directions(make_runtime):
    a, b = make_runtime(), make_runtime()
    stub = a.stub(peer_pb2_grpc.PeerStub, b.address)
    tensors = [
        torch.randn(300, 700),
        torch.arange(10, dtype=torch.int64),
        torch.ones(3, 3, dtype=torch.bfloat16),
        torch.zeros(0),
    ]

    def frames():
        for t in tensors:
            yield from tensor_frames(t, chunk_bytes=64 * 1024)

    ack = a.run(stub.Absorb(frames()), 10)
    assert ack.tensors == len(tensors)
    assert ack.byte_length == sum(t.numel() * t.element_size() for t in tensors)

    async def fetch():
        reader = TensorReader(
            stub.Emit(peer_pb2.EmitRequest(byte_length=3_000_001)), a.config.tensor_limits
        )
        return await reader.read_tensor()

    got = a.run(fetch(), 10)
    assert got.shape == (3_000_001,) and got.dtype == torch.uint8 and not got.any()
    snap = b.traffic.snapshot()
    assert snap["peers"][a.peer_id.to_string()]["bytes_in"] >= ack.byte_length
    assert snap["services"]["shoal.v1.Peer"]["bytes_out"] >= 3_000_001


def test_shutdown_is_fast_idempotent_and_cancels_tasks(make_runtime):
    a, b = make_runtime(), make_runtime()
    stub = a.stub(peer_pb2_grpc.PeerStub, b.address)
    a.run(stub.Ping(peer_pb2.PingRequest()), 5)
    hung = a.submit(asyncio.sleep(3600))
    start = time.perf_counter()
    a.close()
    a.close()
    # close() bounds itself by CLOSE_TIMEOUT_S; the wall-clock check, loose for loaded
    # machines, catches waiting on the hung task instead of cancelling it
    assert time.perf_counter() - start < CLOSE_TIMEOUT_S + 3.0
    assert hung.cancelled()
    assert not a._thread.is_alive()
    with pytest.raises(RuntimeError):
        a.submit(asyncio.sleep(0))


def test_request_iterator_error_reaches_the_caller(make_runtime):
    # Deadlines here are not the subject: the first call between fresh runtimes also dials
    # and handshakes, which on a starved machine took seconds of a 5 s deadline (the call
    # then failed with PeerTimeout instead of the iterator's error). Connect first, and give
    # the calls deadlines no scheduler delay reaches.
    a, b = make_runtime(), make_runtime()
    stub = a.stub(peer_pb2_grpc.PeerStub, b.address)
    a.run(stub.Ping(peer_pb2.PingRequest(), timeout_s=30), 60)

    def frames():
        yield from tensor_frames(torch.ones(4))
        raise ValueError("codec bug")

    with pytest.raises(ValueError, match="codec bug"):
        a.run(stub.Absorb(frames(), timeout_s=30), 60)
    with pytest.raises(ProtocolViolation, match="cannot be sent"):
        a.run(stub.Absorb(tensor_frames(torch.ones(2, dtype=torch.complex64)), timeout_s=30), 60)


def test_close_from_inside_the_loop(make_runtime):
    a = make_runtime()

    async def close_from_handler():
        a.close()
        return "returned"

    assert a.run(close_from_handler(), 5) == "returned"
    a._thread.join(2.0)
    assert not a._thread.is_alive()


@pytest.mark.parametrize("thread_ran", [False, True])
def test_an_interrupted_start_raises_the_interrupt_and_leaves_nothing_running(
    thread_ran, monkeypatch
):
    # Ctrl-C can land inside Thread.start, before or after the new thread began to run
    # the loop; either way the caller sees the interrupt, not an error of the cleanup.
    real_start = threading.Thread.start

    def interrupted_start(thread):
        if thread_ran or not thread.name.startswith("shoal-net-"):
            real_start(thread)
        if thread.name.startswith("shoal-net-"):
            raise KeyboardInterrupt

    runtime = NetRuntime(Identity.generate(), NetConfig())
    monkeypatch.setattr(threading.Thread, "start", interrupted_start)
    with pytest.raises(KeyboardInterrupt):
        runtime.start()
    monkeypatch.undo()
    assert runtime.state is State.CLOSED
    if thread_ran:
        runtime._thread.join(CLOSE_TIMEOUT_S)
        assert not runtime._thread.is_alive() and runtime._loop.is_closed()
    runtime.close()  # still safe


def test_port_in_use_is_a_config_error(make_runtime, capfd):
    a = make_runtime()
    b = NetRuntime(Identity.generate(), NetConfig(port=a.port))
    start = time.perf_counter()
    with pytest.raises(
        ConfigError, match=f"cannot listen on 127.0.0.1:{a.port}: Address already in use"
    ):
        b.start()
    assert "add_port" not in capfd.readouterr().err  # refused before gRPC logs its own line
    assert time.perf_counter() - start < CLOSE_TIMEOUT_S + 3.0
    assert b.state is State.CLOSED and not b._thread.is_alive()
    b.close()  # still safe


class _OddHandlers(PeerService):
    """Emit written with context.write(), Info as a plain function: both must work."""

    async def Emit(self, request, context):
        for frame in tensor_frames(torch.arange(5, dtype=torch.int32)):
            await context.write(frame)

    def Info(self, request, context):
        return peer_pb2.PeerInfo(version=current_caller().short())


def test_handler_styles(make_runtime):
    a, b = make_runtime(), make_runtime()
    b.add_servicer(
        peer_pb2_grpc.add_PeerServicer_to_server,
        _OddHandlers(b.identity, b.sessions, b.config, b.addresses, lambda: []),
    )
    stub = a.stub(peer_pb2_grpc.PeerStub, b.address)
    assert a.run(stub.Info(peer_pb2.InfoRequest()), 5).version == a.peer_id.short()

    async def fetch():
        return await TensorReader(
            stub.Emit(peer_pb2.EmitRequest()), a.config.tensor_limits
        ).read_tensor()

    assert a.run(fetch(), 5).tolist() == [0, 1, 2, 3, 4]


class _Hang(PeerService):
    """Ping never answers (until cancelled)."""

    started: threading.Event

    async def Ping(self, request, context):
        _Hang.started.set()
        await asyncio.Event().wait()


def test_close_cancels_hung_handlers_in_time(make_runtime):
    a, b = make_runtime(), make_runtime()
    _Hang.started = threading.Event()
    b.add_servicer(
        peer_pb2_grpc.add_PeerServicer_to_server,
        _Hang(b.identity, b.sessions, b.config, b.addresses, lambda: []),
    )
    stub = a.stub(peer_pb2_grpc.PeerStub, b.address)
    pending = a.submit(stub.Ping(peer_pb2.PingRequest(), timeout_s=30))
    assert _Hang.started.wait(10)
    start = time.perf_counter()
    b.close()
    assert time.perf_counter() - start < CLOSE_TIMEOUT_S + 3.0  # not the call's 30 s
    with pytest.raises(PeerUnavailable):
        pending.result(10)  # the caller learns at once, long before its 30 s deadline
