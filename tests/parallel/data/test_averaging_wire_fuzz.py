"""The Averaging handler fed malformed streams through a real server, with a valid session.

``Deliver`` takes a meta frame (a ``RoundMessage``) and up to two tensor frames. Malformed
meta messages, garbage frames and well-formed metas followed by garbage must be answered OK
or with a clear refusal: never an unmapped exception, never a hang, and nothing allocated
from a size the request claims.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from net.wire_fuzz import HIDDEN, OK_OR_REFUSED, RawCaller, ServerCrashes, messages, requests

from shoal.net import Identity, NetConfig, NetRuntime, meta_frame, tensor_frames
from shoal.net.proto.v1 import averaging_pb2, tensor_pb2
from shoal.net.tensors import encode_frame
from shoal.parallel.data.grpc_transport import GrpcTransport

DELIVER = "/shoal.v1.Averaging/Deliver"
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
CRASHES = ServerCrashes()


@pytest.fixture(scope="module")
def served() -> Iterator[RawCaller]:
    server_rt = NetRuntime(Identity.generate(), NetConfig()).start()
    client_rt = NetRuntime(Identity.generate(), NetConfig()).start()
    GrpcTransport.for_runtime(server_rt)
    try:
        with CRASHES:
            yield RawCaller(client_rt, server_rt.address)
    finally:
        client_rt.close()
        server_rt.close()


def _meta_then(meta: averaging_pb2.RoundMessage, tail: list[bytes]) -> list[bytes]:
    return [encode_frame(meta_frame(meta)), *tail]


@FUZZ
@given(
    stream=st.one_of(
        st.lists(requests(tensor_pb2.TensorFrame), min_size=1, max_size=4),
        st.builds(
            _meta_then,
            messages(averaging_pb2.RoundMessage),
            st.lists(requests(tensor_pb2.TensorFrame), max_size=3),
        ),
        st.builds(
            _meta_then,
            messages(averaging_pb2.RoundMessage),
            st.just([encode_frame(f) for f in tensor_frames(torch.arange(1000.0))]),
        ),
    )
)
def test_deliver_refuses_malformed_streams(served, stream: list[bytes]) -> None:
    code = served.call(DELIVER, "stream_unary", stream)
    assert code in OK_OR_REFUSED or code == HIDDEN, code
    assert CRASHES.messages == []


def test_memory_stayed_bounded(served) -> None:
    assert CRASHES.peak_growth_mib() < 512, CRASHES.peak_growth_mib()


PULL = "/shoal.v1.Averaging/Pull"


@pytest.mark.parametrize(
    "body",
    [
        averaging_pb2.PullRequest(round_id=b"").SerializeToString(),
        averaging_pb2.PullRequest(round_id=b"r" * 65).SerializeToString(),
        b"\xff\xff\xff",
    ],
    ids=["empty-round-id", "long-round-id", "garbage"],
)
def test_pull_refuses_bad_requests(served, body: bytes) -> None:
    code = served.call(PULL, "unary_stream", body)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, code
    assert CRASHES.messages == []


def test_a_pull_with_nothing_for_the_caller_ends_at_its_deadline(served) -> None:
    short = RawCaller(served.client, served.address, timeout_s=0.5)
    body = averaging_pb2.PullRequest(round_id=b"nobody-sends").SerializeToString()
    # The server ends it when the caller's deadline is up, or the caller gives up first.
    code = short.call(PULL, "unary_stream", body)
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED), code
    assert CRASHES.messages == []
