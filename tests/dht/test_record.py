import contextlib
import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.dht.config import RecordLimits
from shoal.dht.record import (
    Record,
    Rejection,
    decode_record,
    encode_record,
    sign_record,
    validate,
)
from shoal.errors import ProtocolViolation
from shoal.net.identity import Identity

NOW = 1_800_000_000.0
LIMITS = RecordLimits(max_key_bytes=64, max_subkey_bytes=40, max_value_bytes=128, max_ttl_s=3600)
ALICE = Identity.from_seed(b"alice")
MALLORY = Identity.from_seed(b"mallory")


def _rec(**kw) -> Record:
    args = dict(key=b"k", value=b"v", expires_at=NOW + 60, subkey=b"")
    args.update(kw)
    return sign_record(ALICE, **args)


def test_valid_plain_and_owned_subkey_records_accepted():
    assert validate(_rec(), NOW, LIMITS) is None
    assert validate(_rec(subkey=ALICE.peer_id.raw), NOW, LIMITS) is None
    assert validate(_rec(subkey=ALICE.peer_id.raw + b"x"), NOW, LIMITS) is None


@pytest.mark.parametrize(
    "field, value",
    [("value", b"w"), ("key", b"other"), ("expires_at", NOW + 61), ("subkey", b"s" * 32)],
)
def test_tampered_record_is_forged(field, value):
    rec = _rec()
    forged = Record(**{**{f: getattr(rec, f) for f in Record.__slots__}, field: value})
    reason = validate(forged, NOW, LIMITS)
    assert reason in (Rejection.BAD_SIGNATURE, Rejection.NOT_SUBKEY_OWNER)


def test_signature_by_someone_else_is_forged():
    honest = _rec()
    forged = Record(
        honest.key,
        honest.subkey,
        b"evil",
        honest.expires_at,
        ALICE.peer_id,
        MALLORY.sign(
            Record(honest.key, b"", b"evil", honest.expires_at, ALICE.peer_id, b"").signing_bytes()
        ),
    )
    assert validate(forged, NOW, LIMITS) is Rejection.BAD_SIGNATURE
    unsigned = Record(honest.key, b"", honest.value, honest.expires_at, ALICE.peer_id, b"\0" * 64)
    assert validate(unsigned, NOW, LIMITS) is Rejection.BAD_SIGNATURE


def test_expired_and_far_future_refused():
    assert validate(_rec(expires_at=NOW - 1), NOW, LIMITS) is Rejection.EXPIRED
    assert validate(_rec(expires_at=NOW), NOW, LIMITS) is Rejection.EXPIRED
    far = NOW + LIMITS.max_ttl_s + LIMITS.max_clock_skew_s + 1
    assert validate(_rec(expires_at=far), NOW, LIMITS) is Rejection.FAR_FUTURE
    assert validate(_rec(expires_at=math.inf), NOW, LIMITS) is Rejection.MALFORMED


@pytest.mark.parametrize(
    "kw",
    [
        {"key": b"k" * 65},
        {"value": b"v" * 129},
        {"subkey": ALICE.peer_id.raw + b"x" * 9},
    ],
)
def test_oversized_refused(kw):
    assert validate(_rec(**kw), NOW, LIMITS) is Rejection.OVERSIZED


def test_subkey_of_another_owner_refused():
    # Alice signs correctly, but claims a subkey that belongs to Mallory.
    rec = _rec(subkey=MALLORY.peer_id.raw + b"1")
    assert validate(rec, NOW, LIMITS) is Rejection.NOT_SUBKEY_OWNER
    assert validate(_rec(subkey=b"short"), NOW, LIMITS) is Rejection.NOT_SUBKEY_OWNER


def test_codec_round_trip_keeps_signature_valid():
    rec = _rec(subkey=ALICE.peer_id.raw + b"q", value=b"\x00\xff" * 10)
    back = decode_record(encode_record(rec), LIMITS)
    assert back == rec
    assert validate(back, NOW, LIMITS) is None


def test_decode_rejects_wrong_shapes():
    good = msgpack.unpackb(encode_record(_rec()), raw=True)
    for bad in (
        [2, *good[1:]],
        good[:-1],
        [*good[:4], "1", *good[5:]],
        [*good[:4], True, *good[5:]],
        [*good[:5], b"short", good[6]],
        [*good[:6], b"sig"],
        {"a": 1},
    ):
        with pytest.raises(ProtocolViolation):
            decode_record(msgpack.packb(bad, use_bin_type=True), LIMITS)
    with pytest.raises(ProtocolViolation):
        decode_record(b"\xc6\xff\xff\xff\xff", LIMITS)  # claims a 4 GiB bin
    with pytest.raises(ProtocolViolation):
        decode_record(b"x" * 70_000, LIMITS)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_decode_fuzz_raises_only_protocol_violation(data):
    try:
        rec = decode_record(data, LIMITS)
    except ProtocolViolation:
        return
    assert len(rec.writer.raw) == 32 and len(rec.signature) == 64
    assert validate(rec, NOW, LIMITS) is not None  # random bytes never carry a valid signature


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=80),
            st.integers(-(2**63), 2**64 - 1),
            st.floats(),
            st.text(max_size=5),
            st.none(),
        ),
        max_size=8,
    )
)
def test_decode_fuzz_structured(fields):
    with contextlib.suppress(ProtocolViolation):
        decode_record(msgpack.packb(fields, use_bin_type=True), LIMITS)
