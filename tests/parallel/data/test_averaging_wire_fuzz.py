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
from net.wire_fuzz import (
    HIDDEN,
    OK_OR_REFUSED,
    REFUSALS,
    RawCaller,
    ServerCrashes,
    messages,
    requests,
)

from shoal.net import Identity, NetConfig, NetRuntime, meta_frame, tensor_frames
from shoal.net.proto.v1 import averaging_pb2, tensor_pb2
from shoal.net.tensors import encode_frame
from shoal.parallel.data.grpc_transport import GrpcTransport
from shoal.parallel.data.transport import Inbox

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


def _contribution_stream(round_id: bytes, values: torch.Tensor) -> list[bytes]:
    meta = averaging_pb2.RoundMessage(
        round_id=round_id,
        kind=averaging_pb2.CONTRIBUTION,
        part=0,
        weight=1.0,
        codec="none",
        numel=values.numel(),
        payload_tensors=1,
    )
    return _meta_then(meta, [encode_frame(f) for f in tensor_frames(values)])


def test_deliver_refuses_before_allocating_what_the_inbox_would_not_keep() -> None:
    """Refused before a buffer is taken: a part too big for the pending bound, one from a
    peer outside the round, one of the wrong size; a fitting one is kept."""
    server_rt = NetRuntime(Identity.generate(), NetConfig()).start()
    client_rt = NetRuntime(Identity.generate(), NetConfig()).start()
    inbox = Inbox(max_pending_bytes=1 << 20)
    transport = GrpcTransport(server_rt, inbox)
    caller = RawCaller(client_rt, server_rt.address)
    try:
        big = torch.zeros(1 << 19)  # 2 MiB for a round not open here: over the 1 MiB bound
        assert caller.call(DELIVER, "stream_unary", _contribution_stream(b"early", big)) in REFUSALS
        stranger = Identity.generate().peer_id
        inbox.open(b"open", members={server_rt.peer_id, stranger}, part_sizes=[1000])
        part = torch.arange(1000.0)
        assert caller.call(DELIVER, "stream_unary", _contribution_stream(b"open", part)) in REFUSALS
        inbox.open(b"sized", members={client_rt.peer_id}, part_sizes=[999])
        assert (
            caller.call(DELIVER, "stream_unary", _contribution_stream(b"sized", part)) in REFUSALS
        )
        assert transport.service.pool.pooled_bytes == 0 and inbox.messages(b"early") == []
        inbox.open(b"fits", members={client_rt.peer_id}, part_sizes=[1000])
        code = caller.call(DELIVER, "stream_unary", _contribution_stream(b"fits", part))
        assert code == grpc.StatusCode.OK
        (kept,) = inbox.messages(b"fits")
        assert torch.equal(kept.data, part) and kept.sender == client_rt.peer_id
    finally:
        client_rt.close()
        server_rt.close()
