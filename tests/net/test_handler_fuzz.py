"""Every Peer handler fed malformed bytes through a real server, with a valid session.

Each handler must answer OK or a clear refusal (see ``wire_fuzz.REFUSALS``): never an
unmapped exception (UNKNOWN), never a hang, never unbounded memory; the server keeps serving.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire_fuzz import HIDDEN, OK_OR_REFUSED, RawCaller, ServerCrashes, requests

from shoal.net.config import NetConfig
from shoal.net.identity import Identity
from shoal.net.proto.v1 import peer_pb2, peer_pb2_grpc, tensor_pb2
from shoal.net.runtime import NetRuntime

UNARY = {
    "/shoal.v1.Peer/Handshake": ("unary_unary", peer_pb2.HandshakeRequest),
    "/shoal.v1.Peer/Ping": ("unary_unary", peer_pb2.PingRequest),
    "/shoal.v1.Peer/Info": ("unary_unary", peer_pb2.InfoRequest),
    "/shoal.v1.Peer/Emit": ("unary_stream", peer_pb2.EmitRequest),
}
ABSORB = "/shoal.v1.Peer/Absorb"
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
SEEN: set[grpc.StatusCode | str] = set()
CRASHES = ServerCrashes()


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[NetRuntime, NetRuntime, RawCaller]]:
    a = NetRuntime(Identity.generate(), NetConfig()).start()
    b = NetRuntime(Identity.generate(), NetConfig(max_emit_bytes=1 << 16)).start()
    try:
        with CRASHES:
            yield a, b, RawCaller(a, b.address)
    finally:
        a.close()
        b.close()


def _still_serves(a: NetRuntime, b: NetRuntime) -> None:
    stub = a.stub(peer_pb2_grpc.PeerStub, b.address)
    assert a.run(stub.Ping(peer_pb2.PingRequest(payload=b"ok"), timeout_s=5), 10).payload == b"ok"


@FUZZ
@given(data=st.data(), method=st.sampled_from(sorted(UNARY)))
def test_unary_handlers_refuse_malformed_requests(pair, data, method) -> None:
    raw = pair[2]
    kind, cls = UNARY[method]
    code = raw.call(method, kind, data.draw(requests(cls)))
    SEEN.add(code)
    # a handshake that proves nothing is an authentication failure, not a malformed call
    handshake = {grpc.StatusCode.UNAUTHENTICATED} if method.endswith("Handshake") else set()
    assert code in OK_OR_REFUSED | handshake
    assert CRASHES.messages == []


@FUZZ
@given(frames=st.lists(requests(tensor_pb2.TensorFrame), max_size=5))
def test_absorb_refuses_malformed_frames(pair, frames) -> None:
    raw = pair[2]
    code = raw.call(ABSORB, "stream_unary", iter(frames))
    SEEN.add(code)
    assert code in OK_OR_REFUSED | {HIDDEN}
    assert CRASHES.messages == []


def test_oversized_messages_are_refused_before_any_handler(pair) -> None:
    raw = pair[2]
    big = b"\x0a" + b"\xff\xff\xff\x03" + b"\0" * (8 << 20)  # field 1, 8 MiB: over 4 MiB
    assert raw.call("/shoal.v1.Peer/Ping", "unary_unary", big) == grpc.StatusCode.RESOURCE_EXHAUSTED
    code = raw.call(ABSORB, "stream_unary", iter([big]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_server_still_serves_after_fuzzing_and_memory_stayed_bounded(pair) -> None:
    a, b, _ = pair
    _still_serves(a, b)
    assert grpc.StatusCode.INVALID_ARGUMENT in SEEN  # the fuzzing really reached refusals
    # the largest request was 8 MiB: nothing allocated anywhere near a size it claimed
    assert CRASHES.peak_growth_mib() < 512, CRASHES.peak_growth_mib()
