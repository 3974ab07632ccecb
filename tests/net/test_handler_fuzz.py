"""Every Peer handler fed malformed bytes over the wire, with a valid session.

The handler must answer OK or a protocol status; never crash (UNKNOWN), never hang.
"""

from __future__ import annotations

import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.net.auth import AUTH_METADATA_KEY
from shoal.net.proto.v1 import peer_pb2, peer_pb2_grpc

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.INTERNAL,  # gRPC's answer when the request does not parse
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
UNARY = ["/shoal.v1.Peer/Ping", "/shoal.v1.Peer/Info", "/shoal.v1.Peer/Emit"]


@pytest.fixture(scope="module")
def pair():
    from shoal.net.config import NetConfig
    from shoal.net.identity import Identity
    from shoal.net.runtime import NetRuntime

    a = NetRuntime(Identity.generate(), NetConfig()).start()
    b = NetRuntime(Identity.generate(), NetConfig(max_emit_bytes=1 << 16)).start()
    stub = a.stub(peer_pb2_grpc.PeerStub, b.address)
    a.run(stub.Ping(peer_pb2.PingRequest()), 5)
    yield a, b
    a.close()
    b.close()


def _token(a, method: str) -> tuple[tuple[str, bytes], ...]:
    conn = next(iter(a.pool._conns.values()))
    return ((AUTH_METADATA_KEY, conn.session.token(method, time.time())),)


async def _send(address, method, kind, body, metadata):
    async with grpc.aio.insecure_channel(address) as channel:
        ident = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            if kind == "unary":
                await channel.unary_unary(method, **ident)(body, timeout=5, metadata=metadata)
            elif kind == "unary_stream":
                async for _ in channel.unary_stream(method, **ident)(
                    body, timeout=5, metadata=metadata
                ):
                    pass
            else:
                await channel.stream_unary(method, **ident)(
                    iter(body), timeout=5, metadata=metadata
                )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(method=st.sampled_from(UNARY), body=st.binary(max_size=200))
def test_unary_handlers_fuzz(pair, method, body):
    a, b = pair
    kind = "unary_stream" if method.endswith("Emit") else "unary"
    code = a.run(_send(b.address, method, kind, body, _token(a, method)), 10)
    assert code in ALLOWED


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    frames=st.lists(
        st.one_of(st.binary(max_size=100), st.binary(max_size=60).map(lambda x: b"\x0a" + x)),
        max_size=5,
    )
)
def test_absorb_fuzz(pair, frames):
    a, b = pair
    method = "/shoal.v1.Peer/Absorb"
    code = a.run(_send(b.address, method, "stream", frames, _token(a, method)), 10)
    assert code in ALLOWED
