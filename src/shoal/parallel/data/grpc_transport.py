"""The all-reduce over ``shoal.net``: the ``Averaging`` gRPC service and its client side.

:class:`GrpcTransport` implements :class:`RoundTransport` for members identified by
:class:`~shoal.net.PeerID`. ``send`` opens one ``Averaging/Deliver`` stream per message: a
meta frame (``RoundMessage``) and the part's tensors as raw chunks (memoryviews of the
part, no copy before gRPC). :class:`AveragingService` receives them: it checks every
field against bounds before allocating, takes the sender from the authenticated caller
(never from the message), reads the tensors into pooled buffers (``receive.py``), and puts
the message into the inbox. Messages that are not for a member of the round are filtered
by the protocol, which ignores non-members. Client-mode members are not dialed: they pull
what is addressed to them with ``Averaging/Pull`` (see :class:`GrpcTransport`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence, Set
from typing import Any, ClassVar

import torch

from shoal.compress import Encoded
from shoal.errors import NetworkError, ProtocolViolation
from shoal.net.config import TensorLimits
from shoal.net.identity import PEER_ID_BYTES, PeerID
from shoal.net.proto.v1 import averaging_pb2 as pb
from shoal.net.proto.v1 import averaging_pb2_grpc as rpc
from shoal.net.proto.v1 import tensor_pb2
from shoal.net.runtime import NetRuntime
from shoal.net.server import current_caller
from shoal.net.tensors import (
    Chunk,
    encode_frame,
    make_header,
    meta_frame,
    payload_frames,
    tensor_bytes,
)
from shoal.parallel.data.averager import GroupSpec
from shoal.parallel.data.buffers import BufferPool
from shoal.parallel.data.matchmaking import Group
from shoal.parallel.data.messages import Contribution, Member, Message, Reduced, Report
from shoal.parallel.data.outbox import Outbox
from shoal.parallel.data.receive import read_tensor_into_pool
from shoal.parallel.data.transport import Inbox

__all__ = [
    "MAX_BANDWIDTH_BPS",
    "MAX_GROUP_SIZE",
    "MIN_BANDWIDTH_BPS",
    "AveragingService",
    "GrpcTransport",
    "parse",
]

MAX_GROUP_SIZE = 256
MIN_BANDWIDTH_BPS = 1e3
MAX_BANDWIDTH_BPS = 1e11
_RATE_SAMPLE_MIN_BYTES = 256 * 1024
"""Smaller sends measure latency, not bandwidth."""
MAX_ROUND_ID_BYTES = 64
MAX_BLOCK_SIZE = 1 << 20
"""Largest block of a blockwise codec accepted from the wire (the defaults are 256 and 4096)."""
MAX_PULL_S = 900.0
"""The longest a pull stream stays open, whatever deadline the client asks for."""
_PULL_ATTEMPTS = 5
_PULL_BACKOFF_S = 0.5
_MAX_PULLED_MESSAGES = 4 * MAX_GROUP_SIZE
"""A reducer sends a client one report and at most a few results per round."""
MAX_REASON_CHARS = 200
_log = logging.getLogger(__name__)
_KIND = {Contribution: pb.CONTRIBUTION, Report: pb.REPORT, Reduced: pb.REDUCED}
_TYPE = {kind: cls for cls, kind in _KIND.items()}


class _Wire:
    """A message ready to send: its meta frame and (header, payload view) per tensor.

    Built once per message: a reducer sends the same result to every member, and the
    payload checksum in each header is computed only once. With ``reuse`` (results, which
    go to every member) each chunk is also serialized only once, on first use, and the
    same bytes go out on every stream; otherwise chunks are serialized by gRPC's
    serializer as they are sent (nothing is held).
    """

    __slots__ = ("_encoded", "meta", "tensors")

    def __init__(
        self,
        meta: Any,
        tensors: tuple[tuple[tensor_pb2.TensorHeader, memoryview], ...],
        *,
        reuse: bool,
    ) -> None:
        self.meta = meta
        self.tensors = tensors
        self._encoded: list[bytes] | None = [] if reuse else None

    def frames(self) -> Iterator[Any]:
        plain = itertools.chain([self.meta], *(payload_frames(h, p) for h, p in self.tensors))
        encoded = self._encoded
        if encoded is None:
            return plain
        return self._shared(plain, encoded)

    @staticmethod
    def _shared(plain: Iterator[Any], encoded: list[bytes]) -> Iterator[Any]:
        for i, frame in enumerate(plain):
            if i == len(encoded):
                encoded.append(encode_frame(frame))
            yield encoded[i]


def _wire(message: Message) -> _Wire:
    meta = pb.RoundMessage(round_id=message.round_id, kind=_KIND[type(message)], part=message.part)
    tensors: tuple[torch.Tensor, ...] = ()
    if isinstance(message, Report):
        meta.peers.extend(_raw(p) for p in sorted(message.accepted, key=_raw))
        for peer, reason in message.rejected.items():
            meta.rejected.add(peer_id=_raw(peer), reason=reason[:MAX_REASON_CHARS])
    else:
        meta.weight = message.weight
        if isinstance(message, Reduced):
            meta.peers.extend(_raw(p) for p in sorted(message.contributors, key=_raw))
        data = message.data
        if isinstance(data, Encoded):
            meta.codec = data.codec
            meta.numel = data.numel
            meta.block_size = int(data.meta.get("block_size", 0))
            tensors = data.payload
        else:
            meta.codec = "none"
            meta.numel = data.numel()
            tensors = (data,)
        meta.payload_tensors = len(tensors)
    payloads = []
    for t in tensors:
        view = tensor_bytes(t)
        payloads.append((make_header(t, view), view))
    return _Wire(meta_frame(meta), tuple(payloads), reuse=isinstance(message, Reduced))


def _frames(message: Message) -> Iterator[Any]:
    """The frames of one ``Deliver`` stream carrying ``message``."""
    return _wire(message).frames()


def _raw(peer: Member) -> bytes:
    if isinstance(peer, PeerID):
        return peer.raw
    raise TypeError(f"gRPC averaging members must be PeerIDs, got {type(peer).__name__}")


def _peer(raw: bytes) -> PeerID:
    if len(raw) != PEER_ID_BYTES:
        raise ProtocolViolation(f"peer id of {len(raw)} bytes")
    return PeerID(raw)


def _check_payload(meta: pb.RoundMessage, tensors: list[torch.Tensor]) -> Encoded | torch.Tensor:
    n = meta.numel
    if meta.codec == "none":
        (t,) = tensors
        if t.dtype != torch.float32 or t.numel() != n:
            raise ProtocolViolation(f"raw part must be {n} float32 values")
        return t.reshape(-1)
    if meta.codec == "fp16":
        (t,) = tensors
        if t.dtype != torch.float16 or t.numel() != n:
            raise ProtocolViolation(f"fp16 part must be {n} float16 values")
        return Encoded("fp16", (n,), (t.reshape(-1),))
    # Blockwise codecs: quantised values + one fp32 scale per block.
    q, scales = tensors
    bs = meta.block_size
    codec = meta.codec
    dtype, stored = (torch.int8, n) if codec == "int8" else (torch.uint8, -(-n // 2))
    if bs < 1 or q.dtype != dtype or q.numel() != stored or scales.dtype != torch.float32:
        raise ProtocolViolation(f"malformed {codec} part")
    if bs > MAX_BLOCK_SIZE:  # a decoder works block by block: bound what one block costs
        raise ProtocolViolation(f"{codec} part with block size {bs} (at most {MAX_BLOCK_SIZE})")
    if codec == "int4" and bs % 2:
        raise ProtocolViolation(f"int4 part with odd block size {bs}")
    if scales.numel() != -(-n // bs):
        raise ProtocolViolation(f"{codec} part with {scales.numel()} scales for {n} values")
    return Encoded(codec, (n,), (q.reshape(-1), scales.reshape(-1)), {"block_size": bs})


def parse(meta: pb.RoundMessage, sender: PeerID, tensors: list[torch.Tensor]) -> Message:
    """Validate a received meta + tensors and build the protocol message."""
    if not 0 < len(meta.round_id) <= MAX_ROUND_ID_BYTES:
        raise ProtocolViolation(f"round id of {len(meta.round_id)} bytes")
    if meta.part >= MAX_GROUP_SIZE or len(meta.peers) > MAX_GROUP_SIZE:
        raise ProtocolViolation("part index or peer list exceeds the group size limit")
    if len(meta.rejected) > MAX_GROUP_SIZE:
        raise ProtocolViolation("rejection list exceeds the group size limit")
    peers = frozenset(_peer(p) for p in meta.peers)
    if meta.kind == pb.REPORT:
        if tensors:
            raise ProtocolViolation("a report carries no tensors")
        rejected: dict[Member, str] = {
            _peer(r.peer_id): r.reason[:MAX_REASON_CHARS] for r in meta.rejected
        }
        return Report(meta.round_id, sender, meta.part, peers, rejected)
    if meta.kind not in (pb.CONTRIBUTION, pb.REDUCED):
        raise ProtocolViolation(f"unknown round message kind {meta.kind}")
    expected = {"none": 1, "fp16": 1, "int8": 2, "int4": 2}.get(meta.codec)
    if expected is None or len(tensors) != expected:
        raise ProtocolViolation(f"codec {meta.codec!r} with {len(tensors)} tensors")
    data = _check_payload(meta, tensors)
    if meta.kind == pb.CONTRIBUTION:
        return Contribution(meta.round_id, sender, meta.part, meta.weight, data)
    return Reduced(meta.round_id, sender, meta.part, peers, meta.weight, data)


class _Admission:
    """What one incoming round message may allocate, decided from its meta frame.

    The inbox must want the message (a member of the round, a part of the right size, not
    a repeat, see ``Inbox.check``) before any of its tensors is read; no tensor may exceed
    4 bytes per value of the part (fp32, the largest encoding); and bytes for a round not
    open here count against the inbox's pending bound while they are received.
    """

    def __init__(self, inbox: Inbox, pool: BufferPool, sender: PeerID) -> None:
        self._inbox = inbox
        self._pool = pool
        self._sender = sender
        self.reserved = 0
        self._marked: tuple[bytes, type, PeerID, int] | None = None

    def allocator(self, meta: pb.RoundMessage) -> Callable[[int], bytearray]:
        kind = _TYPE.get(meta.kind)
        if kind is None:
            raise ProtocolViolation(f"unknown round message kind {meta.kind}")
        numel = None if kind is Report else meta.numel
        why = self._inbox.check(meta.round_id, kind, self._sender, meta.part, numel)
        if why is not None:
            raise ProtocolViolation(f"round message refused: {why}")
        self._marked = (meta.round_id, kind, self._sender, meta.part)
        self._inbox.receiving(*self._marked)
        pending = not self._inbox.is_open(meta.round_id)
        most = 4 * (numel or 0)

        def take(nbytes: int) -> bytearray:
            if nbytes > most:
                raise ProtocolViolation(f"a tensor of {nbytes} bytes for a part of {numel} values")
            if pending:
                self._inbox.reserve(nbytes)
                self.reserved += nbytes
            return self._pool.take(nbytes)

        return take

    def release(self) -> None:
        """Give the pending bytes and the in-flight mark back (just before the message goes
        into the inbox)."""
        self._inbox.release(self.reserved)
        self.reserved = 0
        if self._marked is not None:
            self._inbox.received(*self._marked)
            self._marked = None


async def receive_message(
    frames: AsyncIterator[Any], sender: PeerID, limits: TensorLimits, admission: _Admission
) -> Message | None:
    """The next round message of ``frames`` (meta frame, then its tensors), or None when
    the stream ends before a meta frame. Raises ProtocolViolation on anything malformed or
    refused by ``admission`` (checked before a tensor is allocated)."""
    try:
        first = await frames.__anext__()
    except StopAsyncIteration:
        return None
    meta = pb.RoundMessage()
    if isinstance(first, Chunk) or first.WhichOneof("frame") != "meta":
        raise ProtocolViolation("a round message starts with a meta frame")
    if not first.meta.Unpack(meta):
        raise ProtocolViolation(f"meta frame is {first.meta.type_url}, not a RoundMessage")
    if meta.payload_tensors > 2:
        raise ProtocolViolation(f"{meta.payload_tensors} payload tensors (at most 2)")
    take = admission.allocator(meta)
    tensors = [
        await read_tensor_into_pool(frames, limits, take) for _ in range(meta.payload_tensors)
    ]
    return parse(meta, sender, tensors)


class AveragingService(rpc.AveragingServicer):
    """Receives round messages into ``inbox`` and serves ``outbox`` to pulling clients."""

    def __init__(
        self,
        runtime: NetRuntime,
        inbox: Inbox,
        outbox: Outbox[_Wire],
        clients: dict[bytes, frozenset[Member]],
    ) -> None:
        self._limits = runtime.config.tensor_limits
        self._inbox = inbox
        self._outbox = outbox
        self._clients = clients  # the transport's: client members of the rounds under way
        self.pool = BufferPool()

    async def Deliver(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> tensor_pb2.TensorAck:
        caller = current_caller()
        admission = _Admission(self._inbox, self.pool, caller)
        try:
            message = await receive_message(
                request_iterator.__aiter__(), caller, self._limits, admission
            )
        finally:
            admission.release()
        if message is None:
            raise ProtocolViolation("empty round message stream")
        self._inbox.deliver(message)
        data = getattr(message, "data", None)
        tensors = () if data is None else data.payload if isinstance(data, Encoded) else (data,)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        return tensor_pb2.TensorAck(byte_length=nbytes, tensors=len(tensors))

    async def Pull(self, request: pb.PullRequest, context: Any) -> AsyncIterator[Any]:
        if not 0 < len(request.round_id) <= MAX_ROUND_ID_BYTES:
            raise ProtocolViolation(f"round id of {len(request.round_id)} bytes")
        caller = current_caller()
        clients = self._clients.get(request.round_id)
        # A round not begun here yet may be pulled (the client can be ahead of us); once it
        # has begun, only its client members may.
        if clients is not None and caller not in clients:
            raise ProtocolViolation("the caller is not a client member of this round")
        remaining = context.time_remaining()
        lifetime = MAX_PULL_S if remaining is None else min(MAX_PULL_S, remaining)
        async with self._outbox.pull(caller, request.round_id, lifetime) as stream:
            while (wire := await stream.next()) is not None:
                try:
                    for frame in wire.frames():
                        yield frame
                except BaseException:
                    stream.put_back()  # the next pull stream sends it
                    raise


class GrpcTransport:
    """Sends round messages to group members at known addresses.

    A runtime serves one ``Averaging`` service: share one transport per runtime between
    its users (``GrpcTransport.for_runtime``); rounds are told apart by their ids.

    Client-mode members are never dialed: between :meth:`begin` and :meth:`end` of a round,
    messages for them are posted to the outbox (``send`` returns at once; they wait there
    until the round's deadline at most), and a client pulls its messages from every
    reducer of the round over streams it opens itself (``Averaging/Pull``), so a peer that
    cannot accept connections still averages.
    """

    _shared: ClassVar[weakref.WeakKeyDictionary[NetRuntime, GrpcTransport]] = (
        weakref.WeakKeyDictionary()
    )

    @classmethod
    def for_runtime(cls, runtime: NetRuntime) -> GrpcTransport:
        """The transport of ``runtime``, created on first use."""
        transport = cls._shared.get(runtime)
        if transport is None:
            transport = cls(runtime)
        return transport

    def __init__(self, runtime: NetRuntime, inbox: Inbox | None = None) -> None:
        self.runtime = runtime
        self.me: Member = runtime.peer_id
        self.inbox = inbox or Inbox()
        self.addresses: dict[PeerID, str] = {}
        self._stubs: dict[PeerID, Any] = {}
        self._inflight: dict[int, list[Any]] = {}
        self._send_rates: list[float] = []
        self._outbox: Outbox[_Wire] = Outbox()
        self._clients: dict[bytes, frozenset[Member]] = {}
        self._pulls: dict[bytes, list[asyncio.Task[None]]] = {}
        self.service = AveragingService(runtime, self.inbox, self._outbox, self._clients)
        runtime.add_servicer(rpc.add_AveragingServicer_to_server, self.service)
        GrpcTransport._shared[runtime] = self

    def uplink_sample(self) -> float | None:
        """The fastest send (bits/s) since the last call, or None; then forgets them.

        A peer's best stream in a round is bounded by its own uplink, while a slow receiver
        can only lower the others: the best one is the estimate of what it can send.
        """
        rates, self._send_rates = self._send_rates, []
        return max(rates) if rates else None

    def join(self, group: Group) -> GroupSpec:
        """The all-reduce group for a matchmaking ``Group``; learns members' addresses.

        Shares follow the bandwidths the members announced, clamped to
        ``[MIN_BANDWIDTH_BPS, MAX_BANDWIDTH_BPS]`` (an announcement cannot claim the whole
        vector or starve a reducer to nothing); client-mode members reduce nothing.
        """
        members = []
        for entry in group.members:
            peer = _peer(entry.peer)
            if entry.address:
                self.set_address(peer, entry.address)
            members.append(peer)
        return GroupSpec(
            group.group_id,
            tuple(members),
            tuple(
                min(MAX_BANDWIDTH_BPS, max(MIN_BANDWIDTH_BPS, e.bandwidth_bps))
                for e in group.members
            ),
            tuple(e.client_mode for e in group.members),
        )

    def set_address(self, peer: PeerID, address: str) -> None:
        self.addresses[peer] = address
        self._stubs.pop(peer, None)

    def _stub(self, to: Member) -> Any:
        if not isinstance(to, PeerID) or to not in self.addresses:
            raise ProtocolViolation(f"no address for member {to!r}")
        stub = self._stubs.get(to)
        if stub is None:
            stub = self._stubs[to] = self.runtime.stub(rpc.AveragingStub, self.addresses[to], to)
        return stub

    def begin(
        self, round_id: bytes, members: Sequence[Member], clients: Set[Member], deadline: float
    ) -> None:
        """Start round ``round_id`` (on the loop, before any send): messages for
        ``clients`` go to the outbox, and a client starts pulling from every other member
        until :meth:`end` or ``deadline`` (loop clock)."""
        self._clients[round_id] = frozenset(clients)
        if self.me in clients and round_id not in self._pulls:
            self._pulls[round_id] = [
                asyncio.ensure_future(self._pull(m, round_id, deadline))
                for m in members
                if isinstance(m, PeerID) and m != self.me and m not in clients
            ]

    async def end(self, round_id: bytes) -> None:
        """Stop round ``round_id``'s pull streams; later sends dial every member again."""
        self._clients.pop(round_id, None)
        tasks = self._pulls.pop(round_id, [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _pull(self, reducer: PeerID, round_id: bytes, deadline: float) -> None:
        """Receive ``reducer``'s messages for us in ``round_id`` into the inbox.

        A broken stream is reopened (the reducer requeues what it could not write) up to
        ``_PULL_ATTEMPTS`` times before ``deadline``; a reducer that sends anything
        malformed is not asked again (the round then misses its part and fails cleanly).
        """
        loop = asyncio.get_running_loop()
        limits = self.runtime.config.tensor_limits
        for attempt in range(_PULL_ATTEMPTS):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                stub = self._stub(reducer)
                frames = stub.Pull(pb.PullRequest(round_id=round_id), timeout_s=remaining)
                stream = frames.__aiter__()
                for _ in range(_MAX_PULLED_MESSAGES):
                    admission = _Admission(self.inbox, self.service.pool, reducer)
                    try:
                        message = await receive_message(stream, reducer, limits, admission)
                    finally:
                        admission.release()
                    if message is None:
                        return
                    if message.round_id != round_id:
                        raise ProtocolViolation("pulled a message of another round")
                    self.inbox.deliver(message)
                return
            except ProtocolViolation as exc:
                _log.warning("pull from %s: %s; not asking it again this round", reducer, exc)
                return
            except NetworkError as exc:
                _log.debug("pull from %s (attempt %d): %s", reducer, attempt + 1, exc)
                await asyncio.sleep(min(_PULL_BACKOFF_S, max(0.0, deadline - loop.time())))

    async def send(self, to: Member, message: Message, timeout_s: float) -> None:
        clients = self._clients.get(message.round_id)
        pulled = clients is not None and to in clients
        if not isinstance(to, PeerID):
            raise ProtocolViolation(f"gRPC averaging members must be PeerIDs, got {to!r}")
        stub = None if pulled else self._stub(to)
        # Concurrent sends of one message (a result to every member) share its encoding;
        # the entry lives only while such a send is in flight.
        entry = self._inflight.get(id(message))
        if entry is None or entry[0] is not message:
            entry = self._inflight[id(message)] = [message, _wire(message), 0]
        entry[2] += 1
        wire: _Wire = entry[1]
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            if stub is None:  # the client takes it when it pulls; we do not wait for it
                self._outbox.post(to, message.round_id, wire, timeout_s)
                return
            await stub.Deliver(wire.frames(), timeout_s=max(timeout_s, 1e-3))
            nbytes = sum(view.nbytes for _, view in wire.tensors)
            took = loop.time() - started
            if nbytes >= _RATE_SAMPLE_MIN_BYTES and took > 0:
                self._send_rates.append(8 * nbytes / took)
        finally:
            entry[2] -= 1
            if entry[2] == 0 and self._inflight.get(id(message)) is entry:
                del self._inflight[id(message)]
