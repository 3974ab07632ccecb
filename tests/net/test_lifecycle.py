"""Peers that die mid-stream, restart, or stall: clear errors, bounded time, no stray tasks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from shoal.errors import NetworkError, PeerTimeout, PeerUnavailable
from shoal.net.identity import PeerID
from shoal.net.peer_service import PeerService
from shoal.net.proto.v1 import peer_pb2, peer_pb2_grpc
from shoal.net.tensors import tensor_frames

CHILD = Path(__file__).with_name("child_peer.py")
pytestmark = pytest.mark.slow


class Child:
    """A peer process; ``kill()`` is SIGKILL, ``stop()`` closes stdin and waits."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            raise RuntimeError("child peer did not start")
        info = json.loads(line)
        self.address = info["address"]
        self.port = int(self.address.rsplit(":", 1)[1])
        self.peer_id = PeerID.from_string(info["peer_id"])

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def children():
    made: list[Child] = []

    def make(*args: str) -> Child:
        made.append(Child(*args))
        return made[-1]

    yield make
    for child in made:
        child.stop()


async def _other_tasks() -> Counter[str]:
    """What the loop's tasks are running (gRPC replaces its own server tasks per call)."""
    me = asyncio.current_task()
    return Counter(
        getattr(t.get_coro(), "__qualname__", "?") for t in asyncio.all_tasks() if t is not me
    )


def test_server_killed_mid_stream(make_runtime, children):
    a = make_runtime()
    child = children("serve")
    stub = a.stub(peer_pb2_grpc.PeerStub, child.address, peer_id=child.peer_id)
    a.run(stub.Ping(peer_pb2.PingRequest()), 10)
    before = a.run(_other_tasks(), 5)
    tensor = torch.zeros(256 << 20, dtype=torch.uint8)

    def frames():
        for i, frame in enumerate(tensor_frames(tensor, chunk_bytes=64 << 10)):
            if i == 50:
                child.kill()
            yield frame

    start = time.monotonic()
    with pytest.raises(PeerUnavailable):
        a.run(stub.Absorb(frames(), timeout_s=10), timeout_s=15)
    assert time.monotonic() - start < 10
    assert a.run(_other_tasks(), 5) == before


def test_server_killed_while_streaming_to_us(make_runtime, children):
    a = make_runtime()
    child = children("serve")
    stub = a.stub(peer_pb2_grpc.PeerStub, child.address, peer_id=child.peer_id)
    before = a.run(_other_tasks(), 5)

    async def pull() -> int:
        frames = 0
        async for _ in stub.Emit(
            peer_pb2.EmitRequest(byte_length=64 << 20, chunk_bytes=16 << 10), timeout_s=10
        ):
            frames += 1
            if frames == 20:
                child.kill()
        return frames

    start = time.monotonic()
    with pytest.raises(PeerUnavailable):
        a.run(pull(), 15)
    assert time.monotonic() - start < 10
    assert a.run(_other_tasks(), 5) == before


class _WatchedAbsorb(PeerService):
    """Absorb that reports when it has data, holds the stream until the caller is dead,
    and records how the stream ended (only the first stream is watched)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.receiving = threading.Event()
        self.ended = threading.Event()
        self.caller_dead: asyncio.Event | None = None
        self.outcome: BaseException | None = None
        self.task: asyncio.Task | None = None

    async def Absorb(self, request_iterator, context):
        if self.task is not None:
            return await super().Absorb(request_iterator, context)
        self.task = asyncio.current_task()
        self.caller_dead = asyncio.Event()

        async def watched():
            async for i, frame in _enumerate(request_iterator):
                if i == 20:
                    self.receiving.set()
                    await asyncio.wait_for(self.caller_dead.wait(), 30)
                yield frame

        try:
            return await super().Absorb(watched(), context)
        except BaseException as exc:
            self.outcome = exc
            raise
        finally:
            self.ended.set()


async def _enumerate(aiter):
    i = 0
    async for item in aiter:
        yield i, item
        i += 1


def test_client_killed_mid_stream(make_runtime, children):
    b = make_runtime()
    service = _WatchedAbsorb(b.identity, b.sessions, b.config, b.addresses, lambda: [])
    b.add_servicer(peer_pb2_grpc.add_PeerServicer_to_server, service)
    before = b.run(_other_tasks(), 5)
    child = children("stream", "--target", b.address)
    assert service.receiving.wait(60)
    child.kill()
    b.loop.call_soon_threadsafe(service.caller_dead.set)
    assert service.ended.wait(10)
    assert isinstance(service.outcome, (asyncio.CancelledError, NetworkError))
    b.run(asyncio.wait([service.task], timeout=5), 10)
    assert b.run(_other_tasks(), 5) == before


def test_restarted_peer_is_reconnected(make_runtime, children):
    a = make_runtime()
    first = children("serve", "--seed", "restart-me")
    stub = a.stub(peer_pb2_grpc.PeerStub, first.address, peer_id=first.peer_id)
    a.run(stub.Ping(peer_pb2.PingRequest()), 10)
    first.kill()
    with pytest.raises(PeerUnavailable):
        a.run(stub.Ping(peer_pb2.PingRequest(), timeout_s=2), 5)
    second = children("serve", "--seed", "restart-me", "--port", str(first.port))
    assert second.peer_id == first.peer_id and second.port == first.port
    reply = a.run(
        stub.Ping(peer_pb2.PingRequest(payload=b"back"), idempotent=True, timeout_s=10), 15
    )
    assert reply.payload == b"back"


def test_stalled_stream_times_out_and_cleans_up(make_runtime):
    a, b = make_runtime(), make_runtime()
    stub = a.stub(peer_pb2_grpc.PeerStub, b.address)
    a.run(stub.Ping(peer_pb2.PingRequest()), 5)
    before = a.run(_other_tasks(), 5)

    async def stalled():
        yield next(iter(tensor_frames(torch.ones(4))))
        await asyncio.Event().wait()  # never sends the payload

    start = time.monotonic()
    with pytest.raises(PeerTimeout):
        a.run(stub.Absorb(stalled(), timeout_s=0.5), 20)
    assert time.monotonic() - start < 10  # the call's 0.5 s deadline, not run()'s 20 s
    assert a.run(_other_tasks(), 5) == before
    with pytest.raises(PeerTimeout):
        a.run(asyncio.sleep(10), timeout_s=0.2)
