"""A kit for fuzzing gRPC handlers through a real server with a valid session.

- ``requests(cls)``: hypothesis strategy of request bytes for message class ``cls``: messages
  with every field drawn from edge values (huge ints, NaN, long strings, many repeats, nested
  messages, unknown enum values), truncated messages, and plain garbage.
- ``messages(cls)``: the edge-valued messages alone, to wrap in other messages.
- ``RawCaller``: sends such bytes to any method of a served peer, authenticated with the
  caller runtime's session, and returns the status code; responses are read up to a bound,
  then the call is cancelled (long-lived streams count as served).
- ``REFUSALS``: the statuses a handler may answer malformed input with. ``UNKNOWN`` (an
  exception the handler did not map) and ``DEADLINE_EXCEEDED`` (a hang) are never allowed.
- ``HIDDEN``: what ``RawCaller`` returns when the server answered while our request stream
  was still writing: gRPC's client then reports its own INTERNAL ("Internal error from
  Core") instead of the server's status. Such calls are judged by ``ServerCrashes`` alone.
- ``ServerCrashes``: collects gRPC's log records of exceptions a handler let escape (the
  server answered UNKNOWN), whatever the client saw; ``peak_growth_mib()`` is how far the
  process's peak resident memory rose since it was entered (nothing sized by a request).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

__all__ = [
    "HIDDEN",
    "OK_OR_REFUSED",
    "REFUSALS",
    "RawCaller",
    "ServerCrashes",
    "messages",
    "requests",
]

HIDDEN = "hidden by a late client write"
_GRPC_LOGGER = "grpc._cython.cygrpc"

REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,  # ProtocolViolation, or a request that did not parse
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # over gRPC's message size limit
        grpc.StatusCode.FAILED_PRECONDITION,  # other ShoalErrors: well formed, not servable here
    }
)
OK_OR_REFUSED = REFUSALS | {grpc.StatusCode.OK}

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted({lo, hi, 0, 1, max(lo, -1), min(hi, 2**31), min(hi, 2**32 - 1)})
    return st.one_of(st.sampled_from(edges), st.integers(max(lo, -1000), min(hi, 1 << 20)))


def _scalar(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    t = field.type
    if t in _INT_RANGES:
        return _ints(*_INT_RANGES[t])
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if t == FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, 40)  # proto3 enums are open: unknown values arrive as ints
    if t == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.text(max_size=40), st.just("9" * 5000), st.just("x" * 70_000))
    if t == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.just(b"\xff" * 300_000))
    if t == FieldDescriptor.TYPE_MESSAGE:
        return _messages(field.message_type, depth - 1)
    raise AssertionError(f"unhandled field type {t} of {field.full_name}")


def _tiny(field: FieldDescriptor) -> Any:
    """A small non-default value of ``field``'s type."""
    t = field.type
    if t == FieldDescriptor.TYPE_MESSAGE:
        return GetMessageClass(field.message_type)()
    if t == FieldDescriptor.TYPE_STRING:
        return "a"
    if t == FieldDescriptor.TYPE_BYTES:
        return b"a"
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return 1.0
    return True if t == FieldDescriptor.TYPE_BOOL else 1


def _messages(descriptor: Descriptor, depth: int) -> st.SearchStrategy[Message]:
    cls = GetMessageClass(descriptor)
    if depth < 0:
        return st.just(cls())
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in descriptor.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            key, value = (
                f.message_type.fields_by_name["key"],
                f.message_type.fields_by_name["value"],
            )
            fields[f.name] = st.dictionaries(_scalar(key, depth), _scalar(value, depth), max_size=3)
        elif f.is_repeated:
            many = [_tiny(f)] * 20_000  # a count no handler should walk or allocate for
            fields[f.name] = st.one_of(st.lists(_scalar(f, depth), max_size=4), st.just(many))
        else:
            fields[f.name] = _scalar(f, depth)
    optional = {name: st.none() | s for name, s in fields.items()}
    return st.fixed_dictionaries(optional).map(
        lambda kw: cls(**{k: v for k, v in kw.items() if v is not None})
    )


def messages(cls: type[Message], depth: int = 2) -> st.SearchStrategy[Message]:
    """Messages of ``cls`` with every field drawn from edge values (or left unset)."""
    return _messages(cls.DESCRIPTOR, depth)


def requests(cls: type[Message], depth: int = 2) -> st.SearchStrategy[bytes]:
    """Serialized requests for ``cls``: edge-valued messages, truncations and garbage."""
    whole = _messages(cls.DESCRIPTOR, depth).map(lambda m: m.SerializeToString())
    cut = st.tuples(whole, st.integers(1, 16)).map(lambda t: t[0][: max(0, len(t[0]) - t[1])])
    return st.one_of(whole, whole, cut, st.binary(max_size=200))


def _peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ServerCrashes(logging.Handler):
    """``with ServerCrashes() as crashes:`` ... ``assert crashes.messages == []``."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []
        self._peak_at_start_mib = 0.0

    def peak_growth_mib(self) -> float:
        return _peak_rss_mib() - self._peak_at_start_mib

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "raised by servicer method" in message:
            self.messages.append(message)

    def __enter__(self) -> ServerCrashes:
        self._peak_at_start_mib = _peak_rss_mib()
        logging.getLogger(_GRPC_LOGGER).addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger(_GRPC_LOGGER).removeHandler(self)


class RawCaller:
    """Raw-bytes calls from runtime ``client`` to the peer at ``address`` (see module doc)."""

    def __init__(self, client: Any, address: str, *, timeout_s: float = 10.0) -> None:
        self.client = client
        self.address = address
        self.timeout_s = timeout_s

    def call(
        self, method: str, kind: str, body: bytes | Iterable[bytes], max_responses: int = 8
    ) -> grpc.StatusCode | str:
        """Run one call; ``kind`` is unary_unary, unary_stream, stream_unary or stream_stream.

        Returns the status the server answered, or ``HIDDEN`` (see the module docstring).
        """
        return self.client.run(self._call(method, kind, body, max_responses), self.timeout_s + 5)

    async def _call(
        self, method: str, kind: str, body: bytes | Iterable[bytes], max_responses: int
    ) -> grpc.StatusCode | str:
        conn = await self.client.pool.get(self.address, None, self.timeout_s)
        metadata = conn.metadata(method)
        ident: dict[str, Any] = dict(request_serializer=bytes, response_deserializer=bytes)
        async with grpc.aio.insecure_channel(self.address) as channel:
            multi = getattr(channel, kind)(method, **ident)
            call = multi(body, timeout=self.timeout_s, metadata=metadata)
            try:
                if kind.endswith("_unary"):
                    await call
                else:
                    received = 0
                    async for _ in call:
                        received += 1
                        if received >= max_responses:
                            call.cancel()
                            return grpc.StatusCode.OK  # a stream that keeps serving is fine
            except grpc.aio.AioRpcError as exc:
                late_write = exc.code() == grpc.StatusCode.INTERNAL and kind.startswith("stream_")
                if late_write and exc.details() == "Internal error from Core":
                    return HIDDEN
                return exc.code()
            except asyncio.CancelledError:
                if call.cancelled():
                    return grpc.StatusCode.OK
                raise
        return grpc.StatusCode.OK
