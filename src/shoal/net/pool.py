"""Connections to other peers: one gRPC channel + one session per (address, PeerID).

``ConnectionPool.get`` returns a connection with a live session: it dials, handshakes, backs
off between failed attempts to the same address (``NetConfig.reconnect``), refuses banned
peers, and handshakes again whenever the channel had to reconnect (a session belongs to one
transport connection, so a restarted peer is picked up transparently). Failed connections
are retired and closed once idle; idle connections are closed by ``sweep``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import grpc

from shoal.errors import AuthenticationError, NetworkError, PeerTimeout, PeerUnavailable
from shoal.net.aio import within
from shoal.net.auth import AUTH_METADATA_KEY, HANDSHAKE_METHOD, ClientHandshake, ClientSession
from shoal.net.config import NetConfig
from shoal.net.errmap import map_rpc_error
from shoal.net.health import PeerHealth
from shoal.net.identity import Identity, PeerID
from shoal.net.proto.v1 import peer_pb2, tensor_pb2
from shoal.net.retry import Backoff
from shoal.net.tensors import decode_frame, encode_frame
from shoal.net.traffic import Traffic

log = logging.getLogger(__name__)
_READY = grpc.ChannelConnectivity.READY
_MAX_BACKOFF_ENTRIES = 4096


def channel_options(config: NetConfig) -> list[tuple[str, Any]]:
    """gRPC client channel arguments derived from NetConfig."""
    policy = config.reconnect
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", int(config.keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", int(policy.initial_s * 1000)),
        # gRPC also uses the "min reconnect backoff" as its minimum connect timeout: tying it to
        # the (short) initial backoff made connects over slow or loaded links fail with "timed
        # out before receiving SETTINGS frame", so it follows connect_timeout_s instead.
        (
            "grpc.min_reconnect_backoff_ms",
            int(max(policy.initial_s, config.connect_timeout_s) * 1000),
        ),
        ("grpc.max_reconnect_backoff_ms", int(policy.max_s * 1000)),
        ("grpc.enable_retries", 0),
        ("grpc.use_local_subchannel_pool", 1),
    ]


class _Shared:
    """Marks what a caller queued behind another's handshake gets: a copy of its failed
    verdict, or its own wait running out. The failure is counted once, by the caller that
    made the handshake (four calls queued on one refused dial made four strikes of the
    five that ban a peer)."""


class _SharedUnavailable(_Shared, PeerUnavailable):
    pass


class _SharedTimeout(_Shared, PeerTimeout):
    pass


class _SharedAuthentication(_Shared, AuthenticationError):
    pass


def _shared(error: NetworkError, label: str) -> NetworkError:
    """The error a queued caller gets when the handshake it waited for failed."""
    cls: type[NetworkError] = _SharedUnavailable
    if isinstance(error, AuthenticationError):
        cls = _SharedAuthentication
    elif isinstance(error, PeerTimeout):
        cls = _SharedTimeout
    return cls(f"handshake failed while this call waited: {error}", peer=label)


class Connection:
    """A channel to one address, the session on it, and cached method callables."""

    def __init__(
        self,
        address: str,
        expected: PeerID | None,
        config: NetConfig,
        identity: Identity,
        traffic: Traffic,
    ) -> None:
        self.address = address
        self.expected = expected
        self._peer_id: PeerID | None = expected
        self._label = expected.to_string() if expected is not None else address
        self.session: ClientSession | None = None
        self.inflight = 0
        self.last_used_s = time.monotonic()
        self._config = config
        self._identity = identity
        self._traffic = traffic
        self._lock = asyncio.Lock()
        self._attempts = 0  # handshakes started on this connection
        self._finished = 0  # handshakes that ended (a caller queued behind one shares it)
        self._last_error: NetworkError | None = None
        self._callables: dict[str, Any] = {}
        target = (
            address
            if address.startswith("unix:")
            else f"ipv4:{address}"
            if address[:1].isdigit()
            else address
        )
        self.channel = grpc.aio.insecure_channel(target, options=channel_options(config))

    @property
    def peer_id(self) -> PeerID | None:
        """The peer's PeerID: the expected one, or the one learned from the handshake."""
        return self._peer_id

    @property
    def label(self) -> str:
        """The peer's PeerID string when known, else its address (traffic key)."""
        return self._label

    @property
    def reach_key(self) -> str:
        """Health key of failed dials and calls: the peer *at this address*. A peer that
        restarts on another port (or behind another relay) is reachable again there, and
        the failures its old address piled up while it was down must not ban it."""
        return self._label if self.expected is None else f"{self._label}@{self.address}"

    def _live(self) -> bool:
        session = self.session
        return (
            session is not None
            and not session.expired(time.time())
            and self.channel.get_state(try_to_connect=False) == _READY
        )

    async def ensure_session(self, timeout_s: float) -> ClientSession:
        """The current session, handshaking first when there is none or the link was redone."""
        if self._live():
            assert self.session is not None
            return self.session
        finished_seen = self._finished
        try:
            await within(self._lock.acquire(), timeout_s)
        except asyncio.TimeoutError:  # another call's handshake is still going: no verdict
            raise _SharedTimeout("handshake queue timed out", peer=self.label) from None
        try:
            if not self._live():
                if self._finished != finished_seen and self._last_error is not None:
                    # a handshake failed while we queued: share its verdict, don't redial
                    raise _shared(self._last_error, self.label) from self._last_error
                self._attempts += 1
                self._last_error = None  # a cancelled handshake leaves no verdict to share
                try:
                    await self._handshake(timeout_s)
                    self._last_error = None
                except NetworkError as exc:
                    self._last_error = exc
                    raise
                finally:
                    self._finished += 1
            assert self.session is not None
            return self.session
        finally:
            self._lock.release()

    async def _handshake(self, timeout_s: float) -> None:
        self.session = None
        hs = ClientHandshake(
            self._identity,
            swarm_key=self._config.swarm_key,
            expected=self.peer_id,
            now_s=time.time(),
        )
        call = self.channel.unary_unary(
            HANDSHAKE_METHOD,
            request_serializer=peer_pb2.HandshakeRequest.SerializeToString,
            response_deserializer=peer_pb2.HandshakeResponse.FromString,
        )
        try:
            resp = await call(hs.request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, peer=self.label, method=HANDSHAKE_METHOD) from exc
        session = hs.finish(resp, time.time())
        allow = self._config.allowlist
        if allow is not None and session.peer_id.raw not in allow:
            raise AuthenticationError("peer is not on the allowlist", peer=session.peer_id.short())
        self._peer_id = session.peer_id
        self._label = session.peer_id.to_string()
        self.session = session

    def metadata(self, method: str) -> tuple[tuple[str, bytes], ...]:
        """Per-call auth metadata (requires a session)."""
        if self.session is None:
            raise PeerUnavailable("no session", peer=self.label)
        self.last_used_s = time.monotonic()
        return ((AUTH_METADATA_KEY, self.session.token(method, time.time())),)

    def callable(
        self,
        path: str,
        kind: str,
        serializer: Callable[[Any], bytes],
        deserializer: Callable[[bytes], Any],
    ) -> Any:
        """The channel's multicallable for ``path``, counting bytes both ways."""
        found = self._callables.get(path)
        if found is not None:
            return found
        if serializer == tensor_pb2.TensorFrame.SerializeToString:
            serializer = encode_frame
        if deserializer == tensor_pb2.TensorFrame.FromString:
            deserializer = decode_frame
        traffic, conn = self._traffic, self

        def ser(message: Any) -> bytes:
            data = serializer(message)
            traffic.sent(conn.label, path, len(data))
            return data

        def deser(data: bytes) -> Any:
            traffic.received(conn.label, path, len(data))
            return deserializer(data)

        make = getattr(self.channel, kind)
        found = make(path, request_serializer=ser, response_deserializer=deser)
        self._callables[path] = found
        return found

    async def close(self, grace_s: float | None) -> None:
        await self.channel.close(grace_s)


class ConnectionPool:
    """Live connections keyed by (address, expected PeerID); see the module docstring."""

    def __init__(
        self,
        identity: Identity,
        config: NetConfig,
        traffic: Traffic,
        health: PeerHealth,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._identity = identity
        self._config = config
        self._traffic = traffic
        self.health = health
        self._clock = clock
        self._rng = rng
        self._conns: dict[tuple[str, bytes | None], Connection] = {}
        self._retired: list[Connection] = []
        self._backoff: dict[str, Backoff] = {}
        self._returned: dict[str, float] = {}
        """Peer label -> when it first opened a session with us since a failure to reach
        it last counted (it was up then)."""
        self._closed = False

    def __len__(self) -> int:
        return len(self._conns)

    def now(self) -> float:
        """The pool's clock: what ``failed(began_s=...)`` compares."""
        return self._clock()

    async def get(self, address: str, peer_id: PeerID | None, timeout_s: float) -> Connection:
        """A connection with a live session; raises PeerUnavailable/PeerTimeout/AuthenticationError."""
        if self._closed:
            raise PeerUnavailable("network runtime is closed", peer=address)
        now = self._clock()
        key = (address, peer_id.raw if peer_id is not None else None)
        conn = self._conns.get(key)
        if conn is None:
            conn = self._conns[key] = Connection(
                address, peer_id, self._config, self._identity, self._traffic
            )
        label = conn.label  # misbehaviour bans hold a peer anywhere
        if self.health.is_banned(label, now):
            raise PeerUnavailable("peer is temporarily banned", peer=label)
        if self.health.is_banned(conn.reach_key, now):
            raise PeerUnavailable(f"peer is temporarily banned at {address}", peer=label)
        if conn._live():
            return conn
        backoff = self._backoff.get(address)
        if backoff is None:
            if len(self._backoff) >= _MAX_BACKOFF_ENTRIES:
                self._backoff.clear()  # only delays are lost, never correctness
            backoff = self._backoff[address] = Backoff()
        wait = backoff.wait_s(now)
        if wait >= timeout_s:
            raise PeerUnavailable(
                f"backing off for {wait:.2f} s after {backoff.failures} failed connects", peer=label
            )
        if wait > 0:
            await asyncio.sleep(wait)
            timeout_s -= wait
        try:
            await conn.ensure_session(min(timeout_s, self._config.connect_timeout_s))
        except NetworkError as exc:
            if self._counts(conn, exc, now):
                backoff.failed(self._config.reconnect, self._clock(), self._rng())
            self.failed(conn, exc, began_s=now)
            raise
        self._backoff.pop(address, None)  # reachable again: forget past failures
        return conn

    def peer_returned(self, peer: PeerID) -> None:
        """``peer`` opened a session with us: it is up, so the bans its addresses earned
        (and their reconnect backoff) are lifted, once per ban, and attempts to reach it
        that began before now no longer count when they fail (:meth:`failed`; until one
        that began after counts, later sessions excuse nothing more). A peer
        restarted at its old address was refused for up to the ban's length (10 s at
        first), and a round that grouped it failed for every member (nobody could send it
        a part). Dials made without knowing the PeerID (bootstrap addresses) are not
        forgiven."""
        label, now = peer.to_string(), self._clock()
        if label not in self._returned and len(self._returned) >= _MAX_BACKOFF_ENTRIES:
            self._returned.clear()  # only lets stale failures count again
        # The first return since a failure counted, not the latest: a peer that opened
        # sessions with us during every dial of ours would otherwise excuse them all.
        self._returned.setdefault(label, now)
        for address in self.health.forgive_reach(label, now):
            self._backoff.pop(address, None)

    def _counts(self, conn: Connection, exc: NetworkError, began_s: float | None) -> bool:
        """Whether a failure to reach ``conn``'s peer counts against it: not a queued
        caller's copy of another's verdict, nor an attempt begun before the peer called us
        (first since the last failure that counted). Dials begun while a peer was down
        failed after it came back and had called us; their strikes banned it again, now
        with nothing left to lift the ban."""
        if isinstance(exc, _Shared):
            return False
        returned = self._returned.get(conn.label)
        return began_s is None or returned is None or began_s > returned

    def succeeded(self, conn: Connection) -> None:
        self.health.success(conn.reach_key, self._clock())

    def failed(self, conn: Connection, exc: NetworkError, began_s: float | None = None) -> None:
        """Feed a failure to health; a transport failure retires the connection.

        Unreachable, silent or someone else answering (``PeerUnavailable``,
        ``PeerTimeout``, ``AuthenticationError``) counts against the peer at this address,
        unless the attempt began (``began_s``, :meth:`now`) before the peer last called us;
        what the peer itself answered (an error status, a malformed reply) counts against
        it wherever it is, so another port evades nothing.
        """
        unreachable = isinstance(exc, (PeerUnavailable, PeerTimeout, AuthenticationError))
        key = conn.reach_key if unreachable else conn.label
        now = self._clock()
        counts = not unreachable or self._counts(conn, exc, began_s)
        if counts and unreachable:
            self._returned.pop(conn.label, None)  # the next return excuses afresh
        if counts and self.health.failure(key, now):
            until = self.health.banned_until(key, now) or now
            log.info("banned %s for %.0f s after: %s", key, until - now, exc)
        if isinstance(exc, (PeerUnavailable, AuthenticationError)):
            self.retire(conn)

    def retire(self, conn: Connection) -> None:
        key = (conn.address, conn.expected.raw if conn.expected is not None else None)
        if self._conns.get(key) is conn:
            del self._conns[key]
            self._retired.append(conn)

    async def sweep(self) -> int:
        """Close idle and retired-and-quiet connections; returns how many were closed."""
        now = time.monotonic()
        idle = [
            c
            for c in self._conns.values()
            if c.inflight == 0 and now - c.last_used_s > self._config.idle_close_s
        ]
        for conn in idle:
            self.retire(conn)
        quiet = [
            c
            for c in self._retired
            if c.inflight == 0 or now - c.last_used_s > self._config.stream_timeout_s
        ]
        self._retired = [c for c in self._retired if c not in quiet]
        for conn in quiet:
            await conn.close(None)
        return len(quiet)

    async def close(self) -> None:
        """Close every channel now (in-flight calls fail); idempotent."""
        self._closed = True
        conns = [*self._conns.values(), *self._retired]
        self._conns.clear()
        self._retired.clear()
        await asyncio.gather(*(c.close(None) for c in conns), return_exceptions=True)


__all__ = ["Connection", "ConnectionPool", "channel_options"]
