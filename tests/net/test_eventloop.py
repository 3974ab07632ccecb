"""The network loop's implementation: uvloop by default where installed, asyncio on request,
and calls between runtimes on either kind of loop."""

from __future__ import annotations

import asyncio
import sys

import pytest

from shoal.errors import ConfigError
from shoal.net import eventloop
from shoal.net.config import NetConfig
from shoal.net.proto.v1 import peer_pb2, peer_pb2_grpc

try:
    import uvloop
except ImportError:  # not built for every platform: what does not need it still runs
    uvloop = None

needs_uvloop = pytest.mark.skipif(uvloop is None, reason="uvloop is not installed")


def _kind(loop: asyncio.AbstractEventLoop) -> str:
    try:
        return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
    finally:
        loop.close()


@needs_uvloop
def test_auto_takes_uvloop_and_asyncio_is_asyncio():
    assert _kind(eventloop.new_event_loop("auto")) == "uvloop"
    assert _kind(eventloop.new_event_loop("uvloop")) == "uvloop"
    assert _kind(eventloop.new_event_loop("asyncio")) == "asyncio"


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert _kind(eventloop.new_event_loop("auto")) == "asyncio"
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        eventloop.new_event_loop("uvloop")
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        NetConfig(event_loop="uvloop")  # refused up front, not when the runtime starts


def test_an_unknown_loop_is_refused_up_front():
    with pytest.raises(ConfigError, match="event_loop"):
        NetConfig(event_loop="trio")
    with pytest.raises(ConfigError, match="event loop must be one of"):
        eventloop.new_event_loop("trio")


@needs_uvloop
def test_runtimes_on_either_loop_call_each_other(make_runtime):
    fast, plain = make_runtime(event_loop="uvloop"), make_runtime(event_loop="asyncio")
    assert isinstance(fast.loop, uvloop.Loop) and not isinstance(plain.loop, uvloop.Loop)
    for caller, callee in ((fast, plain), (plain, fast)):
        stub = caller.stub(peer_pb2_grpc.PeerStub, callee.address)
        reply = caller.run(stub.Ping(peer_pb2.PingRequest(payload=b"x" * 1000)), timeout_s=5)
        assert reply.payload == b"x" * 1000
