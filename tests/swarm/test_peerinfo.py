import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.errors import ProtocolViolation
from shoal.swarm.peerinfo import (
    MAX_ROLE_CHARS,
    PeerInfo,
    Reachability,
    decode_peer_info,
    encode_peer_info,
)


def test_round_trip():
    info = PeerInfo(
        addresses=("1.2.3.4:5", "[::1]:7"),
        reachability=Reachability.RELAYED,
        relay=b"r" * 32,
        roles=("dht", "stage:3"),
        throughput=123.5,
        version="0.1.0",
    )
    assert decode_peer_info(encode_peer_info(info)) == info


@pytest.mark.parametrize(
    "kw",
    [
        {"addresses": tuple(f"h:{i}" for i in range(9))},
        {"addresses": ("",)},
        {"roles": ("x" * (MAX_ROLE_CHARS + 1),)},
        {"throughput": float("nan")},
        {"throughput": -1.0},
        {"reachability": Reachability.RELAYED},  # relay missing
        {"relay": b"r" * 32},  # relay without RELAYED
        {"version": "v" * 33},
    ],
)
def test_bounds_enforced(kw):
    with pytest.raises(ValueError):
        PeerInfo(**kw)


def test_decode_rejects_bad_payloads():
    for bad in (
        b"",
        b"\xc1",
        msgpack.packb({"v": 2}),
        msgpack.packb({"v": 1, "a": "notalist"}),
        msgpack.packb({"v": 1, "t": True}),
        msgpack.packb({"v": 1, "r": "teleport"}),
        msgpack.packb({"v": 1, "a": ["h:1"] * 9}),
        b"x" * 5000,
    ):
        with pytest.raises(ProtocolViolation):
            decode_peer_info(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decode_fuzz(data):
    with contextlib.suppress(ProtocolViolation):
        info = decode_peer_info(data)
        assert len(info.addresses) <= 8 and len(info.roles) <= 16
