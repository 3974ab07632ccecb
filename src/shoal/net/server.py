"""The gRPC server of a peer: service registry, per-call authentication, accounting.

Services are registered with their generated ``add_<Name>Servicer_to_server`` function,
before or after the server starts (``Dispatcher.add``). Every call except
``Peer/Handshake`` must carry a valid session token (see ``auth.py``); a call that fails is
answered UNAUTHENTICATED by the dispatcher, which runs before the handler and before any
request message is read. Handlers learn the authenticated caller from ``current_caller()``.
A handler that raises a ShoalError answers with the matching status (``errmap.status_of``).
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from shoal.errors import ProtocolViolation, ShoalError
from shoal.net.auth import AUTH_METADATA_KEY, HANDSHAKE_METHOD, AuthFailure, SessionTable
from shoal.net.errmap import status_of
from shoal.net.identity import PeerID
from shoal.net.proto.v1 import tensor_pb2
from shoal.net.tensors import decode_frame, encode_frame
from shoal.net.traffic import Traffic

log = logging.getLogger(__name__)
_caller: contextvars.ContextVar[PeerID | None] = contextvars.ContextVar(
    "shoal_caller", default=None
)
AUTH_DETAIL_PREFIX = "shoal-auth:"
_MAX_WRAPPED = 8192


def current_caller() -> PeerID:
    """The authenticated PeerID of the call being handled (inside a handler only)."""
    peer = _caller.get()
    if peer is None:
        raise RuntimeError("current_caller() is only defined inside an authenticated handler")
    return peer


def fast_codecs(handler: grpc.RpcMethodHandler) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(request_deserializer, response_serializer), with the tensor fast path swapped in."""
    deser, ser = handler.request_deserializer, handler.response_serializer
    if deser == tensor_pb2.TensorFrame.FromString:
        deser = decode_frame
    if ser == tensor_pb2.TensorFrame.SerializeToString:
        ser = encode_frame
    return deser, ser


class _Registrar:
    """Stands in for a grpc server when a generated ``add_*_to_server`` runs."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: generated code also calls add_registered_method_handlers."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for name, handler in handlers.items():
            self.handlers[f"/{service}/{name}"] = handler


def _rejection(
    detail: str, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED
) -> grpc.RpcMethodHandler:
    async def reject(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, detail)

    return grpc.stream_stream_rpc_method_handler(reject)


_OWN_PACKAGE = "/shoal.v1."
"""Methods of Shoal's own services start with this."""


class Dispatcher(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Finds the handler of a call, authenticates the caller, wraps it for accounting."""

    def __init__(
        self, sessions: SessionTable, traffic: Traffic, clock: Callable[[], float] = time.time
    ) -> None:
        self._sessions = sessions
        self._traffic = traffic
        self._clock = clock
        self._methods: dict[str, grpc.RpcMethodHandler] = {}
        # wrapped handlers per (method, caller): built once, reused by later calls
        self._wrapped: dict[tuple[str, PeerID | None], grpc.RpcMethodHandler] = {}

    def add(self, register: Callable[[Any, Any], None], servicer: Any) -> list[str]:
        """Register a servicer via its generated ``add_*_to_server``; returns method paths."""
        registrar = _Registrar()
        register(servicer, registrar)
        self._methods.update(registrar.handlers)
        self._wrapped.clear()
        return sorted(registrar.handlers)

    def remove(self, service: str) -> None:
        """Stop serving every method of ``service`` (e.g. ``shoal.v1.Stage``); its calls
        are answered UNAVAILABLE from then on (see :meth:`service`)."""
        prefix = f"/{service}/"
        for path in [p for p in self._methods if p.startswith(prefix)]:
            del self._methods[path]
        self._wrapped.clear()

    @property
    def methods(self) -> frozenset[str]:
        return frozenset(self._methods)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method: str = handler_call_details.method
        handler = self._methods.get(method)
        if handler is None:
            # A Shoal service not served here now is answered as a peer that is down
            # would be, not UNIMPLEMENTED: a caller counts an answer against the peer
            # wherever it is (a ban its restart does not lift), and a peer only starts
            # its services after its server (a restarted one was called at once by peers
            # that knew it) and stops them before it. Anything else is not Shoal's.
            if method.startswith(_OWN_PACKAGE):
                return _rejection("service not served here now", grpc.StatusCode.UNAVAILABLE)
            return None  # UNIMPLEMENTED
        if method == HANDSHAKE_METHOD:
            return self._cached(handler, None, method)
        token = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == AUTH_METADATA_KEY:
                token = value
                break
        try:
            peer = self._sessions.verify(token, method, self._clock())
        except AuthFailure as exc:
            return _rejection(f"{AUTH_DETAIL_PREFIX}{exc}")
        return self._cached(handler, peer, method)

    def _cached(
        self, handler: grpc.RpcMethodHandler, peer: PeerID | None, method: str
    ) -> grpc.RpcMethodHandler:
        key = (method, peer)
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            if len(self._wrapped) >= _MAX_WRAPPED:
                self._wrapped.clear()
            wrapped = self._wrapped[key] = self._wrap(handler, peer, method)
        return wrapped

    def _wrap(
        self, handler: grpc.RpcMethodHandler, peer: PeerID | None, method: str
    ) -> grpc.RpcMethodHandler:
        traffic = self._traffic
        label = peer.to_string() if peer is not None else None
        deser, ser = fast_codecs(handler)

        def count_in(data: bytes) -> Any:
            traffic.received(label, method, len(data))
            try:
                return deser(data)
            except (DecodeError, ProtocolViolation) as exc:
                return _Malformed(f"{method}: malformed request: {exc}")

        def count_out(message: Any) -> bytes:
            data: bytes = ser(message)
            traffic.sent(label, method, len(data))
            return data

        if handler.unary_unary is not None:
            behavior, factory = (
                _unary(handler.unary_unary, peer, method, traffic, False),
                grpc.unary_unary_rpc_method_handler,
            )
        elif handler.stream_unary is not None:
            behavior, factory = (
                _unary(handler.stream_unary, peer, method, traffic, True),
                grpc.stream_unary_rpc_method_handler,
            )
        elif handler.unary_stream is not None:
            behavior, factory = (
                _streaming(handler.unary_stream, peer, method, traffic, False),
                grpc.unary_stream_rpc_method_handler,
            )
        else:
            behavior, factory = (
                _streaming(handler.stream_stream, peer, method, traffic, True),
                grpc.stream_stream_rpc_method_handler,
            )
        return factory(behavior, request_deserializer=count_in, response_serializer=count_out)


class _Malformed:
    """Stands for a request message that did not parse (the handler never sees it)."""

    __slots__ = ("detail",)

    def __init__(self, detail: str) -> None:
        self.detail = detail


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A request stream that raises ProtocolViolation at the first unparsable message."""
    async for request in requests:
        if isinstance(request, _Malformed):
            raise ProtocolViolation(request.detail)
        yield request


def _request(request: Any, streaming: bool) -> Any:
    if streaming:
        return _checked(request)
    if isinstance(request, _Malformed):
        raise ProtocolViolation(request.detail)
    return request


def _unary(
    inner: Callable[..., Any], peer: PeerID | None, method: str, traffic: Traffic, streaming: bool
) -> Callable[..., Any]:
    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
        _caller.set(peer)
        start = time.perf_counter()
        try:
            result = inner(_request(request, streaming), context)
            if inspect.isawaitable(result):
                result = await result
            return result
        except ShoalError as exc:
            await context.abort(status_of(exc), str(exc))
        finally:
            traffic.latency(method, time.perf_counter() - start, side="server")

    return behavior


def _streaming(
    inner: Callable[..., Any], peer: PeerID | None, method: str, traffic: Traffic, streaming: bool
) -> Callable[..., Any]:
    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
        _caller.set(peer)
        start = time.perf_counter()
        try:
            result = inner(_request(request, streaming), context)
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            elif inspect.isawaitable(result):  # a handler that uses context.write()
                await result
            else:
                for item in result:
                    yield item
        except ShoalError as exc:
            await context.abort(status_of(exc), str(exc))
        finally:
            traffic.latency(method, time.perf_counter() - start, side="server")

    return behavior


def server_options(
    max_message_bytes: int, keepalive_s: float, keepalive_timeout_s: float
) -> list[tuple[str, Any]]:
    """gRPC server channel arguments derived from NetConfig."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", int(keepalive_s * 500)),
        ("grpc.http2.max_ping_strikes", 0),
    ]


__all__ = ["AUTH_DETAIL_PREFIX", "Dispatcher", "current_caller", "fast_codecs", "server_options"]
