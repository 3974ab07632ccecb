"""Connection pool behaviour on loopback: idle close, bans, backoff, concurrency."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from shoal.errors import PeerUnavailable, ProtocolViolation
from shoal.net.config import HealthConfig, RetryPolicy
from shoal.net.errmap import concise
from shoal.net.proto.v1 import dht_pb2, dht_pb2_grpc, peer_pb2, peer_pb2_grpc

DEAD = "127.0.0.1:1"  # nothing listens on port 1


def test_idle_connection_is_closed_and_reopened(make_runtime):
    a, b = make_runtime(idle_close_s=30), make_runtime()
    stub = a.stub(peer_pb2_grpc.PeerStub, b.address)
    a.run(stub.Ping(peer_pb2.PingRequest()), 5)
    assert len(a.pool) == 1
    assert a.run(a.pool.sweep(), 5) == 0  # fresh: kept
    conn = next(iter(a.pool._conns.values()))
    conn.last_used_s -= 31  # as if unused for 31 s
    assert a.run(a.pool.sweep(), 5) == 1
    assert len(a.pool) == 0
    assert a.run(stub.Ping(peer_pb2.PingRequest(payload=b"again")), 5).payload == b"again"


def test_failing_peer_is_banned_then_refused_without_dialing(make_runtime):
    a = make_runtime(
        health=HealthConfig(ban_threshold=2, ban_base_s=60, score_half_life_s=1e6),
        reconnect=RetryPolicy(initial_s=0.01, max_s=0.02),
    )
    stub = a.stub(peer_pb2_grpc.PeerStub, DEAD)
    for _ in range(2):
        with pytest.raises(PeerUnavailable):
            a.run(stub.Ping(peer_pb2.PingRequest(), timeout_s=2), 5)
    assert a.health.is_banned(DEAD, time.monotonic())
    with pytest.raises(PeerUnavailable, match="banned"):
        a.run(stub.Ping(peer_pb2.PingRequest(), timeout_s=2), 5)


def test_backoff_refuses_when_the_wait_exceeds_the_deadline(make_runtime):
    a = make_runtime(reconnect=RetryPolicy(initial_s=5.0, max_s=10.0, jitter=0.0))
    stub = a.stub(peer_pb2_grpc.PeerStub, DEAD)
    with pytest.raises(PeerUnavailable):
        a.run(stub.Ping(peer_pb2.PingRequest(), timeout_s=2), 5)
    start = time.monotonic()
    with pytest.raises(PeerUnavailable, match="backing off"):
        a.run(stub.Ping(peer_pb2.PingRequest(), timeout_s=4), 10)
    assert time.monotonic() - start < 2.0  # refused at once, not after the 4 s deadline


def test_concurrent_calls_share_one_session(make_runtime):
    a, b = make_runtime(), make_runtime()
    stub = a.stub(peer_pb2_grpc.PeerStub, b.address)

    async def many():
        replies = await asyncio.gather(
            *(stub.Ping(peer_pb2.PingRequest(payload=str(i).encode())) for i in range(200))
        )
        return [r.payload for r in replies]

    assert a.run(many(), 30) == [str(i).encode() for i in range(200)]
    assert len(a.pool) == 1 and len(b.sessions) == 1


class _Pong(dht_pb2_grpc.DHTServicer):
    async def Ping(self, request, context):
        return dht_pb2.DHTPingResponse()


def test_a_service_not_served_yet_or_any_more_answers_unavailable_not_a_violation(make_runtime):
    """A peer starts its services after its server and stops them before it: calls in
    between are the peer coming or going, not the peer misbehaving, and must not ban it
    wherever it is (a restarted peer was called at once by peers that knew it)."""
    a, b = make_runtime(), make_runtime()
    dht = a.stub(dht_pb2_grpc.DHTStub, b.address, b.peer_id)
    label = b.peer_id.to_string()

    def ping() -> None:
        a.run(dht.Ping(dht_pb2.DHTPingRequest()), 5)

    with pytest.raises(PeerUnavailable, match="UNAVAILABLE: service not served here now"):
        ping()  # not served yet
    b.add_servicer(dht_pb2_grpc.add_DHTServicer_to_server, _Pong())
    ping()
    b.remove_service("shoal.v1.DHT")
    with pytest.raises(PeerUnavailable, match="UNAVAILABLE: service not served here now"):
        ping()  # not served any more
    now = time.monotonic()
    assert a.health.score(label, now) == 0.0 and not a.health.is_banned(label, now)
    # ... they count at its address, where its restart (a call to us) lifts them
    assert a.health.score(f"{label}@{b.address}", now) > 0.0


def test_a_method_of_no_shoal_service_answers_unimplemented(make_runtime):
    b = make_runtime()

    async def call() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(b.address) as channel:
            try:
                await channel.unary_unary("/other.v1.Thing/Do")(b"", timeout=5)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    assert b.run(call(), 10) == grpc.StatusCode.UNIMPLEMENTED


def test_runtime_bridge_rules(make_runtime):
    a = make_runtime()

    async def nested():
        a.run(asyncio.sleep(0), 1)

    with pytest.raises(RuntimeError, match="await instead"):
        a.run(nested(), 5)

    async def start_background():
        return a.spawn(asyncio.sleep(3600), name="background")

    task = a.run(start_background(), 5)
    a.close()
    assert task.cancelled()


def test_identify_and_penalize(make_runtime):
    a, b = make_runtime(health=HealthConfig(ban_threshold=3, score_half_life_s=1e6)), make_runtime()
    assert a.run(a.identify(b.address), 5) == b.peer_id

    async def punish():
        return [a.penalize(b.peer_id) for _ in range(3)]

    assert a.run(punish(), 5) == [False, False, True]
    assert a.is_banned(b.peer_id)
    stub = a.stub(peer_pb2_grpc.PeerStub, b.address, peer_id=b.peer_id)
    with pytest.raises(PeerUnavailable, match="banned"):
        a.run(stub.Ping(peer_pb2.PingRequest()), 5)


def test_concurrent_calls_to_a_dead_peer_dial_once(make_runtime):
    a = make_runtime(reconnect=RetryPolicy(initial_s=5.0, max_s=10.0))
    stub = a.stub(peer_pb2_grpc.PeerStub, DEAD)

    async def many():
        return await asyncio.gather(
            *(stub.Ping(peer_pb2.PingRequest(), timeout_s=3) for _ in range(20)),
            return_exceptions=True,
        )

    start = time.monotonic()
    results = a.run(many(), 10)
    assert all(isinstance(r, PeerUnavailable) for r in results)
    assert time.monotonic() - start < 3
    conn = next(iter(a.pool._retired), None)
    assert conn is not None and conn._attempts == 1


def _banned_at_dead_address(make_runtime):
    """Runtimes ``a`` and ``b``, where ``a`` dialed ``b`` at a dead address until that
    address was banned (as while ``b`` was down there)."""
    a = make_runtime(
        health=HealthConfig(ban_threshold=2, ban_base_s=600, score_half_life_s=1e6),
        reconnect=RetryPolicy(initial_s=0.01, max_s=0.02),
    )
    b = make_runtime()
    gone = a.stub(peer_pb2_grpc.PeerStub, DEAD, peer_id=b.peer_id)
    for _ in range(3):
        with pytest.raises(PeerUnavailable):
            a.run(gone.Ping(peer_pb2.PingRequest(), timeout_s=2), 5)
    with pytest.raises(PeerUnavailable, match="banned"):  # that address stays refused
        a.run(gone.Ping(peer_pb2.PingRequest(), timeout_s=2), 5)
    return a, b


def test_a_peer_restarted_at_another_address_is_not_refused_for_its_old_ones_failures(
    make_runtime,
):
    # A peer stopped and restarted on another port keeps its PeerID. While it was down,
    # calls to its old address failed and banned it; the ban must not follow it to its
    # new address (averaging rounds with it failed for the ban's whole length).
    a, b = _banned_at_dead_address(make_runtime)
    here = a.stub(peer_pb2_grpc.PeerStub, b.address, peer_id=b.peer_id)
    assert a.run(here.Ping(peer_pb2.PingRequest(payload=b"back")), 5).payload == b"back"
    assert not a.is_banned(b.peer_id)


def test_a_peer_that_calls_us_is_no_longer_refused_at_the_address_it_was_down_at(
    make_runtime,
):
    # A peer killed and restarted at the same address: while it was down, dials to it
    # failed and banned its address (10 s at first). Once it is back it calls us, and the
    # ban goes; an averaging round that grouped it failed for every member before.
    a, b = _banned_at_dead_address(make_runtime)

    async def misbehaved() -> None:  # on the loop, as penalize wants
        a.penalize(b.peer_id, 2.0)

    a.run(misbehaved(), 5)  # and it misbehaved: that is not forgiven
    to_a = b.stub(peer_pb2_grpc.PeerStub, a.address, peer_id=a.peer_id)
    b.run(to_a.Ping(peer_pb2.PingRequest()), 5)  # b's handshake with a
    assert a.is_banned(b.peer_id)  # what it answered still counts against it
    assert not a.health.is_banned(f"{b.peer_id.to_string()}@{DEAD}", time.monotonic())
    assert a.pool._backoff.get(DEAD) is None


def test_a_refused_connection_reads_as_the_systems_reason(make_runtime):
    a = make_runtime(reconnect=RetryPolicy(initial_s=0.01, max_s=0.02))
    stub = a.stub(peer_pb2_grpc.PeerStub, DEAD)
    with pytest.raises(PeerUnavailable) as caught:
        a.run(stub.Ping(peer_pb2.PingRequest(), timeout_s=2), 5)
    message = str(caught.value)
    assert f"cannot connect to {DEAD}: connection refused" in message, message
    assert "failed to connect to all addresses" not in message


def test_concise_keeps_what_is_not_a_connect_failure():
    assert concise("round message too large") == "round message too large"
    assert (
        concise(
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:198.18.0.2:7: "
            "Failed to connect to remote host: No route to host"
        )
        == "cannot connect to 198.18.0.2:7: no route to host"
    )


def _connected(make_runtime):
    """Runtime ``a`` (bans after 2 strikes, for 600 s) with a live connection to ``b``."""
    a = make_runtime(health=HealthConfig(ban_threshold=2, ban_base_s=600, score_half_life_s=1e6))
    b = make_runtime()
    stub = a.stub(peer_pb2_grpc.PeerStub, b.address, peer_id=b.peer_id)
    a.run(stub.Ping(peer_pb2.PingRequest()), 5)
    return a, b, a.pool._conns[(b.address, b.peer_id.raw)]


def test_what_a_peer_answers_counts_against_it_wherever_it_is(make_runtime):
    # Failed dials ban an address, but errors and garbage a peer answers with must not be
    # shed by announcing another port.
    a, b, conn = _connected(make_runtime)

    async def fail(exc):
        for _ in range(2):
            a.pool.failed(conn, exc)

    a.run(fail(PeerUnavailable("connection reset")), 5)
    assert not a.is_banned(b.peer_id)  # only its address is refused
    a.run(fail(ProtocolViolation("malformed reply")), 5)
    assert a.is_banned(b.peer_id)


def _no_retries(make_runtime, ban_threshold: int):
    """A runtime whose calls are never retried and whose reconnects barely wait: each
    call is one attempt, so strikes can be counted."""
    return make_runtime(
        health=HealthConfig(ban_threshold=ban_threshold, ban_base_s=60, score_half_life_s=1e6),
        reconnect=RetryPolicy(initial_s=0.01, max_s=0.02),
        call_retry=RetryPolicy(attempts=1),
    )


def test_calls_queued_on_one_refused_dial_are_one_failure_not_one_each(make_runtime):
    # Four calls waiting for one handshake that failed made four strikes: one burst of
    # traffic to a peer that was down for a moment banned it.
    a = _no_retries(make_runtime, ban_threshold=2)
    stub = a.stub(peer_pb2_grpc.PeerStub, DEAD)

    async def together() -> list[object]:
        calls = [stub.Ping(peer_pb2.PingRequest(), timeout_s=2) for _ in range(4)]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = a.run(together(), 10)
    assert all(isinstance(r, PeerUnavailable) for r in results), results
    assert sum("while this call waited" in str(r) for r in results) >= 2  # they did queue
    assert a.health.score(DEAD, time.monotonic()) == pytest.approx(1.0)
    assert not a.health.is_banned(DEAD, time.monotonic())


def test_failures_of_attempts_begun_before_a_peer_called_us_do_not_count(make_runtime):
    # Dials begun while a restarted peer was down failed just after it came back and
    # called us: their strikes banned it again, after its handshake had lifted the old
    # ban, and nothing lifted the new one (every averaging round with it failed).
    a, b, conn = _connected(make_runtime)
    reach = conn.reach_key
    began = a.pool.now()
    to_a = b.stub(peer_pb2_grpc.PeerStub, a.address, peer_id=a.peer_id)
    b.run(to_a.Ping(peer_pb2.PingRequest()), 5)  # b's handshake with a: it is up

    async def fail(since: float) -> None:
        for _ in range(2):
            a.pool.failed(conn, PeerUnavailable("connection refused"), began_s=since)

    a.run(fail(began), 5)
    assert a.health.score(reach, time.monotonic()) == 0.0
    assert not a.health.is_banned(reach, time.monotonic())

    async def once(since: float, returns_first: bool = False) -> None:
        if returns_first:
            a.pool.peer_returned(b.peer_id)
        a.pool.failed(conn, PeerUnavailable("connection refused"), began_s=since)

    # A peer that opens a session with us during each of our dials cannot excuse them
    # all: only dials begun before its first return since a failure counted are excused.
    a.run(once(a.pool.now(), returns_first=True), 5)  # begun after b's handshake: counts
    assert a.health.score(reach, time.monotonic()) == pytest.approx(1.0)
    a.run(once(a.pool.now(), returns_first=True), 5)  # a fresh return excuses this one
    assert a.health.score(reach, time.monotonic()) == pytest.approx(1.0)
    a.run(once(a.pool.now(), returns_first=True), 5)  # the next return is no longer first
    assert a.health.is_banned(reach, time.monotonic())


def test_calls_whose_wait_behind_a_hanging_handshake_runs_out_are_not_strikes(make_runtime):
    # Only the call that made the handshake learns anything about the peer; the queued
    # ones that gave up first were each counted as a failure of their own.
    import socket

    silent = socket.socket()  # accepts connections and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    address = f"127.0.0.1:{silent.getsockname()[1]}"
    a = _no_retries(make_runtime, ban_threshold=3)
    stub = a.stub(peer_pb2_grpc.PeerStub, address)

    async def burst() -> list[object]:
        first = asyncio.ensure_future(stub.Ping(peer_pb2.PingRequest(), timeout_s=2.0))
        while not a.pool._conns:  # the first call owns the handshake
            await asyncio.sleep(0.01)
        queued = [stub.Ping(peer_pb2.PingRequest(), timeout_s=0.5) for _ in range(3)]
        return await asyncio.gather(first, *queued, return_exceptions=True)

    try:
        results = a.run(burst(), 10)
    finally:
        silent.close()
    assert sum("handshake queue timed out" in str(r) for r in results) == 3, results
    assert a.health.score(address, time.monotonic()) == pytest.approx(1.0)
    assert not a.health.is_banned(address, time.monotonic())
