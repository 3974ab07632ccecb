"""Handshake and per-call MAC logic (pure, fake clock)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.net.auth import AuthFailure, ClientHandshake, ReplayWindow, SessionTable
from shoal.net.identity import Identity
from shoal.net.proto.v1 import peer_pb2

NOW = 1_800_000_000.0
ALICE, BOB, MALLORY = (Identity.from_seed(s) for s in (b"alice", b"bob", b"mallory"))
METHOD = "/shoal.v1.Peer/Ping"


def _session(
    table: SessionTable, client: Identity = ALICE, swarm_key: bytes = b"", now: float = NOW
):
    hs = ClientHandshake(client, swarm_key=swarm_key, expected=None, now_s=now)
    return hs.finish(table.accept(hs.request, now), now)


def test_handshake_yields_same_key_and_verified_calls():
    table = SessionTable(BOB)
    session = _session(table)
    assert session.peer_id == BOB.peer_id
    for i in range(3):
        assert table.verify(session.token(METHOD, NOW + i), METHOD, NOW + i) == ALICE.peer_id


def test_tag_binds_method_and_key():
    table = SessionTable(BOB)
    session = _session(table)
    with pytest.raises(AuthFailure, match="bad-mac"):
        table.verify(session.token(METHOD, NOW), "/shoal.v1.Peer/Info", NOW)
    session.key = b"\0" * 32
    with pytest.raises(AuthFailure, match="bad-mac"):
        table.verify(session.token(METHOD, NOW), METHOD, NOW)


def test_replayed_token_rejected_but_reordered_accepted():
    table = SessionTable(BOB, replay_window=8)
    session = _session(table)
    first, second = session.token(METHOD, NOW), session.token(METHOD, NOW)
    table.verify(second, METHOD, NOW)
    table.verify(first, METHOD, NOW)  # out of order is fine
    for token in (first, second):
        with pytest.raises(AuthFailure, match="replay"):
            table.verify(token, METHOD, NOW)


def test_stale_timestamp_and_unknown_session_and_expiry():
    table = SessionTable(BOB, max_skew_s=5, ttl_s=100)
    session = _session(table)
    with pytest.raises(AuthFailure, match="stale"):
        table.verify(session.token(METHOD, NOW - 10), METHOD, NOW)
    with pytest.raises(AuthFailure, match="unknown-session"):
        table.verify(session.token(METHOD, NOW + 101), METHOD, NOW + 101)
    with pytest.raises(AuthFailure, match="unknown-session"):
        table.verify(session.token(METHOD, NOW), METHOD, NOW)  # dropped on expiry
    with pytest.raises(AuthFailure, match="missing"):
        table.verify(None, METHOD, NOW)
    with pytest.raises(AuthFailure, match="malformed"):
        table.verify(b"short", METHOD, NOW)


def test_swarm_key_must_match_both_ways():
    closed = SessionTable(BOB, swarm_key=b"s" * 32)
    with pytest.raises(AuthFailure, match="wrong-swarm"):
        _session(closed, swarm_key=b"x" * 32)
    with pytest.raises(AuthFailure, match="wrong-swarm"):
        _session(closed, swarm_key=b"")
    assert _session(closed, swarm_key=b"s" * 32).peer_id == BOB.peer_id
    hs = ClientHandshake(ALICE, swarm_key=b"s" * 32, expected=None, now_s=NOW)
    open_table = SessionTable(MALLORY)
    hs.request.swarm_proof = b""  # an open-swarm server ignores proofs it cannot check...
    hs.request.signature = ALICE.sign(b"")  # ...but the signature must still match
    with pytest.raises(AuthFailure, match="bad-signature"):
        open_table.accept(hs.request, NOW)


def test_client_rejects_wrong_peer_and_forged_answer():
    table = SessionTable(MALLORY)
    hs = ClientHandshake(ALICE, swarm_key=b"", expected=BOB.peer_id, now_s=NOW)
    with pytest.raises(AuthFailure, match="wrong-peer"):
        table.accept(hs.request, NOW)  # server sees the caller wants someone else
    hs.request.expected_peer_id = b""
    hs.request.signature = b"\0" * 64
    with pytest.raises(AuthFailure, match="bad-signature"):
        table.accept(hs.request, NOW)
    good = ClientHandshake(ALICE, swarm_key=b"", expected=None, now_s=NOW)
    resp = SessionTable(BOB).accept(good.request, NOW)
    resp.session_id = bytes(16)  # tampered in flight
    with pytest.raises(AuthFailure, match="bad-signature"):
        good.finish(resp, NOW)


def test_allowlist_and_old_handshake():
    table = SessionTable(BOB, allowlist=frozenset({MALLORY.peer_id.raw}))
    with pytest.raises(AuthFailure, match="not-allowed"):
        _session(table)
    old = ClientHandshake(ALICE, swarm_key=b"", expected=None, now_s=NOW - 60)
    with pytest.raises(AuthFailure, match="stale"):
        SessionTable(BOB, max_skew_s=5).accept(old.request, NOW)


def test_session_table_is_bounded():
    table = SessionTable(BOB, max_sessions=3)
    sessions = [_session(table) for _ in range(5)]
    assert len(table) == 3
    with pytest.raises(AuthFailure, match="unknown-session"):
        table.verify(sessions[0].token(METHOD, NOW), METHOD, NOW)
    table.verify(sessions[-1].token(METHOD, NOW), METHOD, NOW)


def test_replay_window():
    w = ReplayWindow(4)
    assert not w.accept(0)
    assert w.accept(5) and not w.accept(5)
    assert w.accept(3) and not w.accept(3)
    assert not w.accept(1)  # more than 4 behind
    assert w.accept(100) and not w.accept(96) and w.accept(97)


handshake_requests = st.builds(
    peer_pb2.HandshakeRequest,
    version=st.integers(0, 3),
    peer_id=st.one_of(st.binary(max_size=40), st.just(ALICE.peer_id.raw)),
    ephemeral_key=st.binary(max_size=40),
    nonce=st.binary(max_size=20),
    timestamp_ms=st.one_of(st.integers(0, 2**64 - 1), st.just(int(NOW * 1000))),
    expected_peer_id=st.binary(max_size=33),
    swarm_proof=st.binary(max_size=40),
    signature=st.binary(max_size=70),
)


@settings(max_examples=200, deadline=None)
@given(handshake_requests)
def test_handshake_fuzz_only_auth_failures(req):
    with pytest.raises(AuthFailure):
        SessionTable(BOB).accept(req, NOW)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=80), st.binary(min_size=48, max_size=48)))
def test_token_fuzz_only_auth_failures(token):
    table = SessionTable(BOB)
    _session(table)
    with pytest.raises(AuthFailure):
        table.verify(token, METHOD, NOW)
