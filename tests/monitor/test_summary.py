import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.errors import ProtocolViolation
from shoal.monitor.summary import (
    MAX_SUMMARY_BYTES,
    PeerSummary,
    decode_summary,
    encode_summary,
    summary_from_dict,
)

FULL = PeerSummary(
    peer="sh" + "a" * 52,
    t=1.7e9,
    step=123456,
    step_t=1.7e9 - 3,
    loss=2.5,
    val_bpb=1.9,
    samples_per_s=12.5,
    tokens_per_s=6400.0,
    role="stage_server",
    stage=3,
    reachability="relayed",
    up_bps=2e7,
    down_bps=1e8,
    tx_bps=1.5e6,
    rx_bps=2.5e6,
    demand_per_s=20.0,
    compute_frac=0.5,
    comm_frac=0.3,
    wait_frac=0.1,
    rounds=7,
    failures=2,
)


def test_round_trip_is_exact_and_compact():
    data = encode_summary(FULL)
    assert len(data) <= 320
    assert decode_summary(data) == FULL
    assert summary_from_dict(FULL.to_dict()) == FULL
    minimal = PeerSummary(peer="shx", t=1.0)
    assert decode_summary(encode_summary(minimal)) == minimal


def test_oversized_summary_is_refused_on_both_ends():
    with pytest.raises(ValueError):
        encode_summary(PeerSummary(peer="p" * 2000, t=1.0))
    with pytest.raises(ProtocolViolation):
        decode_summary(b"\x00" * (MAX_SUMMARY_BYTES + 1))


@pytest.mark.parametrize(
    "patch",
    [
        {"p": ""},
        {"p": 5},
        {"t": -1.0},
        {"t": float("nan")},
        {"s": -1},
        {"s": True},
        {"l": float("inf")},
        {"re": "teleported"},
        {"fc": 1.5},
        {"g": 10_000},
        {"sps": "fast"},
        {"tb": -3.0},
    ],
)
def test_decoder_rejects_bad_fields(patch):
    wire = msgpack.unpackb(encode_summary(FULL))
    wire.update(patch)
    with pytest.raises(ProtocolViolation):
        decode_summary(msgpack.packb(wire))


def test_decoder_rejects_missing_required_fields_and_non_maps():
    wire = msgpack.unpackb(encode_summary(FULL))
    del wire["p"]
    with pytest.raises(ProtocolViolation, match="peer"):
        decode_summary(msgpack.packb(wire))
    for data in (msgpack.packb([1, 2]), b"\xc1", msgpack.packb({"p": "x" * 100, "t": 1.0})):
        with pytest.raises(ProtocolViolation):
            decode_summary(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=MAX_SUMMARY_BYTES + 8))
def test_decoder_fails_only_with_protocol_violation(data):
    with contextlib.suppress(ProtocolViolation):
        assert isinstance(decode_summary(data), PeerSummary)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["p", "t", "s", "l", "re", "g", "fc", "x"]),
        st.one_of(
            st.none(),
            st.integers(-(2**63), 2**64 - 1),
            st.floats(),
            st.text(max_size=70),
            st.booleans(),
        ),
    )
)
def test_decoder_on_structured_garbage(wire):
    try:
        s = decode_summary(msgpack.packb(wire))
    except ProtocolViolation:
        return
    assert s.peer == wire["p"] and 0 < len(s.peer) <= 64
