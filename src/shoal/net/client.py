"""Calling other peers: ``Stub`` wraps a generated ``<Service>Stub`` class.

    stub = runtime.stub(peer_pb2_grpc.PeerStub, "10.0.0.5:4000", peer_id=None)
    reply = await stub.Ping(peer_pb2.PingRequest(), timeout_s=2.0)            # unary
    ack = await stub.Absorb(tensor_frames(t), timeout_s=30.0)                # client stream
    async for frame in stub.Emit(req, timeout_s=30.0): ...                   # server stream

Every call: gets a connection with a live session from the pool, signs the call, applies
the deadline (``timeout_s``, default ``NetConfig.call_timeout_s`` / ``stream_timeout_s``),
maps gRPC failures to ``shoal.errors``, and feeds health and latency accounting. Unary
calls marked ``idempotent=True`` are retried on transport failures (``NetConfig.call_retry``);
a call rejected because the peer forgot our session (it restarted) is re-handshaken and
resent once, which is safe because the peer rejected it before any handler work.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
import types
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from shoal.errors import AuthenticationError, NetworkError, PeerTimeout, PeerUnavailable
from shoal.net.config import NetConfig
from shoal.net.errmap import map_rpc_error
from shoal.net.identity import PeerID
from shoal.net.pool import Connection, ConnectionPool
from shoal.net.retry import backoff_s, may_retry
from shoal.net.server import AUTH_DETAIL_PREFIX
from shoal.net.traffic import Traffic

_SESSION_LOST = f"{AUTH_DETAIL_PREFIX}unknown-session"


@dataclass(frozen=True, slots=True)
class MethodSpec:
    path: str
    kind: str  # "unary_unary", "unary_stream", "stream_unary", "stream_stream"
    serializer: Callable[[Any], bytes]
    deserializer: Callable[[bytes], Any]


class _Recorder:
    """Stands in for a channel while a generated stub's constructor runs."""

    def _spec(self, kind: str) -> Callable[..., MethodSpec]:
        def make(
            path: str, request_serializer: Any = None, response_deserializer: Any = None, **_: Any
        ) -> MethodSpec:
            return MethodSpec(path, kind, request_serializer, response_deserializer)

        return make

    def __getattr__(self, kind: str) -> Callable[..., MethodSpec]:
        if kind not in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            raise AttributeError(kind)
        return self._spec(kind)


@functools.lru_cache(maxsize=256)
def method_specs(stub_cls: type) -> Mapping[str, MethodSpec]:
    """The methods of a generated stub class, by attribute name (computed once per class)."""
    stub = stub_cls(_Recorder())
    return types.MappingProxyType(
        {k: v for k, v in vars(stub).items() if isinstance(v, MethodSpec)}
    )


class _SessionLost(AuthenticationError):
    pass


class _Requests:
    """Feeds a request iterator to gRPC, keeping the caller's own exception to re-raise.

    gRPC swallows an exception raised by a request iterator and cancels the call; the
    caller should see its own error (a bug, or a ProtocolViolation from a codec) instead.
    """

    def __init__(self, source: Any) -> None:
        self.source = source
        self.error: BaseException | None = None

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            if hasattr(self.source, "__aiter__"):
                async for item in self.source:
                    yield item
            else:
                for item in self.source:
                    yield item
        except Exception as exc:
            self.error = exc
            raise


def _stop_request_feed(call: Any) -> None:
    """Cancel gRPC's task that drains our request iterator (it outlives a failed call)."""
    poller = getattr(call, "_async_request_poller", None)
    if poller is not None and not poller.done():
        poller.cancel()


def _mapped(exc: grpc.RpcError, conn: Connection, path: str) -> NetworkError:
    details = exc.details() if hasattr(exc, "details") else ""
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED and (details or "").startswith(_SESSION_LOST):
        conn.session = None
        return _SessionLost("peer no longer knows our session", peer=conn.label)
    return map_rpc_error(exc, peer=conn.label, method=path)


class Method:
    """One RPC of a ``Stub``; calling it starts the call (see the module docstring)."""

    def __init__(self, stub: Stub, spec: MethodSpec) -> None:
        self._stub = stub
        self.spec = spec

    def __call__(
        self, request: Any, *, timeout_s: float | None = None, idempotent: bool = False
    ) -> Any:
        kind = self.spec.kind
        if kind == "unary_unary":
            return self._unary(request, timeout_s, idempotent)
        if kind == "stream_unary":
            return self._unary(request, timeout_s, False, streaming=True)
        return self._response_stream(request, timeout_s)

    async def _connect(self, deadline: float) -> Connection:
        loop = asyncio.get_running_loop()
        stub = self._stub
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise PeerTimeout(f"{self.spec.path}: deadline passed", peer=stub.address)
        conn = await stub.pool.get(stub.address, stub.peer_id, remaining)
        stub.peer_id = conn.peer_id
        return conn

    def _callable(self, conn: Connection) -> Any:
        s = self.spec
        return conn.callable(s.path, s.kind, s.serializer, s.deserializer)

    async def _unary(
        self, request: Any, timeout_s: float | None, idempotent: bool, *, streaming: bool = False
    ) -> Any:
        stub, path = self._stub, self.spec.path
        config = stub.config
        loop = asyncio.get_running_loop()
        start = loop.time()
        began = time.perf_counter()  # for the latency: uvloop's clock ticks in milliseconds
        if timeout_s is None:
            timeout_s = config.stream_timeout_s if streaming else config.call_timeout_s
        deadline = start + timeout_s
        attempt, resent = 0, False
        while True:
            attempt += 1
            conn: Connection | None = None
            feed = _Requests(request) if streaming else None
            tried_s = stub.pool.now()  # this attempt's start, on the pool's clock
            try:
                conn = await self._connect(deadline)
                call = self._callable(conn)(
                    feed or request,
                    timeout=max(0.0, deadline - loop.time()),
                    metadata=conn.metadata(path),
                )
                conn.inflight += 1
                try:
                    result = await call
                except grpc.RpcError as exc:
                    if feed is not None and feed.error is not None:
                        raise feed.error from None
                    raise _mapped(exc, conn, path) from exc
                except asyncio.CancelledError:
                    call.cancel()
                    if feed is not None and feed.error is not None:
                        raise feed.error from None  # gRPC cancelled the call, not our caller
                    raise
                finally:
                    conn.inflight -= 1
                    _stop_request_feed(call)
                stub.pool.succeeded(conn)
                stub.traffic.latency(path, time.perf_counter() - began)
                return result
            except _SessionLost:
                if resent or streaming:
                    raise PeerUnavailable(
                        "peer restarted during the call; retry", peer=stub.address
                    ) from None
                resent = True
                attempt -= 1
            except (PeerUnavailable, PeerTimeout) as exc:
                if conn is not None:
                    stub.pool.failed(conn, exc, began_s=tried_s)
                delay = backoff_s(config.call_retry, attempt, stub.rng())
                elapsed = loop.time() - start
                if (
                    not idempotent
                    or not may_retry(config.call_retry, attempt, elapsed, delay)
                    or loop.time() + delay >= deadline
                ):
                    raise
                await asyncio.sleep(delay)
            except NetworkError as exc:
                if conn is not None:
                    stub.pool.failed(conn, exc, began_s=tried_s)
                raise

    async def _response_stream(self, request: Any, timeout_s: float | None) -> AsyncIterator[Any]:
        stub, path = self._stub, self.spec.path
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout_s or stub.config.stream_timeout_s)
        tried_s = stub.pool.now()
        conn = await self._connect(deadline)
        feed = _Requests(request) if self.spec.kind == "stream_stream" else None
        call = self._callable(conn)(
            feed or request, timeout=max(0.0, deadline - loop.time()), metadata=conn.metadata(path)
        )
        conn.inflight += 1
        try:
            async for message in call:
                yield message
            stub.pool.succeeded(conn)
        except grpc.RpcError as exc:
            if feed is not None and feed.error is not None:
                raise feed.error from None
            err = _mapped(exc, conn, path)
            stub.pool.failed(conn, err, began_s=tried_s)
            if isinstance(err, _SessionLost):
                raise PeerUnavailable("peer restarted; retry", peer=conn.label) from exc
            raise err from exc
        finally:
            conn.inflight -= 1
            if not call.done():
                call.cancel()
            _stop_request_feed(call)


class Stub:
    """Authenticated, accounted calls to one peer; one attribute per RPC of ``stub_cls``."""

    def __init__(
        self,
        stub_cls: type,
        *,
        address: str,
        peer_id: PeerID | None,
        pool: ConnectionPool,
        config: NetConfig,
        traffic: Traffic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.address = address
        self.peer_id = peer_id
        self.pool = pool
        self.config = config
        self.traffic = traffic
        self.rng = rng
        self.methods = method_specs(stub_cls)
        for name, spec in self.methods.items():
            setattr(self, name, Method(self, spec))

    def __getattr__(self, name: str) -> Any:  # for type checkers: methods are dynamic
        raise AttributeError(f"{name!r} is not an RPC of this stub")

    def __repr__(self) -> str:
        return f"Stub({self.address}, {self.peer_id!r}, {sorted(self.methods)})"


__all__ = ["Method", "MethodSpec", "Stub", "method_specs"]
