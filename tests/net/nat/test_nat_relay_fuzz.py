"""Every Relay handler fed malformed requests through a real relaying peer, with a session.

DialBack, Listen, Connect, Accept and Punch must answer OK or a clear refusal
(``wire_fuzz.REFUSALS``): never an unmapped exception, never a hang, never an allocation
sized by the request. Connect frames may name a target that really holds a reservation, so
circuits are opened and garbage is carried to (and refused by) that target's server.
Afterwards the relay still carries a real call.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from net.wire_fuzz import HIDDEN, OK_OR_REFUSED, RawCaller, ServerCrashes, requests

from shoal.errors import ProtocolViolation
from shoal.net.config import NetConfig
from shoal.net.identity import Identity
from shoal.net.nat.limits import MAX_FRAME_BYTES, RelayConfig
from shoal.net.nat.reserve import RelayAddress
from shoal.net.nat.service import parse_address
from shoal.net.nat.traversal import Traversal, TraversalConfig
from shoal.net.proto.v1 import peer_pb2, peer_pb2_grpc, relay_pb2
from shoal.net.runtime import NetRuntime

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
UNARY = {
    "/shoal.v1.Relay/DialBack": ("unary_unary", relay_pb2.DialBackRequest),
    "/shoal.v1.Relay/Punch": ("unary_unary", relay_pb2.PunchRequest),
    "/shoal.v1.Relay/Listen": ("unary_stream", relay_pb2.ListenRequest),
}
# host:port look-alikes: odd hosts, non-ASCII digits, ports out of range or far too long
ADDRESSES = st.builds(
    "{}:{}".format,
    st.sampled_from(["127.0.0.1", "", "[::1]", "198.18.0.1", "x" * 100]),
    st.one_of(
        st.sampled_from(["1", "0", "65535", "65536", "-1", "²", "\u0663", "9" * 5000, ""]),
        st.text(alphabet="0123456789²³¹٣", max_size=6),
    ),
)
ADDRESSED = {
    "/shoal.v1.Relay/DialBack": st.lists(ADDRESSES, max_size=5).map(
        lambda a: relay_pb2.DialBackRequest(addresses=a).SerializeToString()
    ),
    "/shoal.v1.Relay/Punch": st.builds(
        relay_pb2.PunchRequest, observed=ADDRESSES, delay_ms=st.sampled_from([0, 2**32 - 1])
    ).map(lambda m: m.SerializeToString()),
}
SEEN: set[grpc.StatusCode | str] = set()
CRASHES = ServerCrashes()


@dataclass
class Bed:
    relay_rt: NetRuntime
    target_rt: NetRuntime
    fuzzer_rt: NetRuntime
    relay: Traversal
    target: Traversal
    raw: RawCaller
    where: RelayAddress


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    runtimes = [NetRuntime(Identity.generate(), NetConfig()).start() for _ in range(3)]
    relay_rt, target_rt, fuzzer_rt = runtimes
    limits = RelayConfig(accept_timeout_s=1.0, idle_timeout_s=2.0, keepalive_s=0.2)
    relay = Traversal(relay_rt, TraversalConfig(relay=limits))
    target = Traversal(target_rt, TraversalConfig())
    try:
        CRASHES.__enter__()
        relay_rt.run(relay.start(), 5)
        target_rt.run(target.start(), 5)
        where = RelayAddress(relay_rt.address, relay_rt.peer_id)

        async def reserve() -> list[RelayAddress]:
            return await target.reserve([where]).wait_held(1, timeout_s=5)

        assert target_rt.run(reserve(), 10) == [where]
        yield Bed(
            relay_rt,
            target_rt,
            fuzzer_rt,
            relay,
            target,
            RawCaller(fuzzer_rt, relay_rt.address),
            where,
        )
    finally:
        CRASHES.__exit__()
        relay_rt.run(relay.close(), 5)
        target_rt.run(target.close(), 5)
        for rt in runtimes:
            rt.close()


def _first_frames(bed: Bed) -> st.SearchStrategy[bytes]:
    """Connect/Accept openings: real and bogus targets and circuits, or garbage."""
    real = bed.target_rt.peer_id.raw
    return st.one_of(
        st.builds(
            relay_pb2.RelayFrame,
            target=st.sampled_from([real, real[:31], real + b"\0", bytes(32), b""]),
            circuit_id=st.sampled_from([0, 1, 2, 2**64 - 1]),
            data=st.binary(max_size=32),
        ).map(lambda f: f.SerializeToString()),
        requests(relay_pb2.RelayFrame),
    )


def _later_frames() -> st.SearchStrategy[bytes]:
    data = st.one_of(
        st.binary(max_size=64),
        st.just(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(64)),  # a bogus HTTP/2 start
        st.just(b"\0" * (MAX_FRAME_BYTES + 1)),  # one byte over the frame cap
    )
    frames = data.map(lambda d: relay_pb2.RelayFrame(data=d).SerializeToString())
    return st.one_of(frames, requests(relay_pb2.RelayFrame))


@FUZZ
@given(data=st.data(), method=st.sampled_from(sorted(UNARY)))
def test_unary_and_listen_handlers_refuse_malformed_requests(bed: Bed, data, method) -> None:
    kind, cls = UNARY[method]
    bodies = requests(cls)
    if method in ADDRESSED:
        bodies = st.one_of(bodies, ADDRESSED[method])
    code = bed.raw.call(method, kind, data.draw(bodies), max_responses=2)
    SEEN.add(code)
    assert code in OK_OR_REFUSED
    assert CRASHES.messages == []


@FUZZ
@given(data=st.data(), accept=st.booleans())
def test_circuit_handlers_refuse_malformed_frames(bed: Bed, data, accept: bool) -> None:
    first = data.draw(_first_frames(bed))
    later = data.draw(st.lists(_later_frames(), max_size=3))
    method = "/shoal.v1.Relay/Accept" if accept else "/shoal.v1.Relay/Connect"
    code = bed.raw.call(method, "stream_stream", iter([first, *later]), max_responses=4)
    SEEN.add(code)
    assert code in OK_OR_REFUSED | {HIDDEN}
    assert CRASHES.messages == []


def test_relay_still_carries_calls_after_fuzzing_and_memory_stayed_bounded(bed: Bed) -> None:
    assert {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION} <= SEEN
    dialer = Traversal(bed.fuzzer_rt, TraversalConfig())

    async def call() -> bytes:
        await dialer.start()
        try:
            address = await dialer.address_for(bed.target_rt.peer_id, direct=[], relays=[bed.where])
            stub = bed.fuzzer_rt.stub(peer_pb2_grpc.PeerStub, address, bed.target_rt.peer_id)
            pong = await stub.Ping(peer_pb2.PingRequest(payload=b"still relaying"), timeout_s=10)
            return pong.payload
        finally:
            await dialer.close()

    assert bed.fuzzer_rt.run(call(), 30) == b"still relaying"
    assert bed.relay.core is not None and bed.relay.core.refused > 0
    assert bed.relay.core.stats()["circuits"], "no fuzzed Connect ever opened a circuit"
    assert CRASHES.peak_growth_mib() < 512, CRASHES.peak_growth_mib()


@pytest.mark.parametrize("port", ["²", "\u0663", "9" * 5000, "65536", "0", ""])
def test_parse_address_refuses_odd_ports_with_a_protocol_violation(port: str) -> None:
    with pytest.raises(ProtocolViolation, match="not an ip:port"):
        parse_address(f"127.0.0.1:{port}")
