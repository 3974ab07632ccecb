"""Round messages on the wire: their frames out, and parsing and admitting them in.

A message travels as one meta frame (``shoal.v1.RoundMessage``) and its tensors as raw
chunks (memoryviews of the part, no copy before gRPC); :class:`Wire` builds that once per
message. On the way in, :class:`Admission` asks the inbox from the meta frame alone
whether it would keep the message (member, part size, not a repeat) before any tensor is
allocated, :func:`receive_message` reads the tensors into pooled buffers (``receive.py``),
and :func:`parse` checks every field and builds the protocol message. The sender is the
authenticated caller, never a field of the message.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import torch
from google.protobuf.message import DecodeError

from shoal.compress import Encoded
from shoal.compress.sparse import check_sparse
from shoal.errors import PeerTimeout, ProtocolViolation
from shoal.net.aio import IdleTimeout
from shoal.net.config import TensorLimits
from shoal.net.identity import PEER_ID_BYTES, PeerID
from shoal.net.proto.v1 import averaging_pb2 as pb
from shoal.net.proto.v1 import tensor_pb2
from shoal.net.tensors import (
    Chunk,
    encode_frame,
    make_header,
    meta_frame,
    payload_frames,
    tensor_bytes,
)
from shoal.parallel.data.buffers import BufferPool
from shoal.parallel.data.messages import (
    MAX_TAG_BYTES,
    Contribution,
    Leave,
    Member,
    Message,
    Reduced,
    Report,
)
from shoal.parallel.data.receive import read_tensor_into_pool
from shoal.parallel.data.transport import REPEAT, Inbox

__all__ = [
    "MAX_BLOCK_SIZE",
    "MAX_GROUP_SIZE",
    "MAX_REASON_CHARS",
    "MAX_ROUND_ID_BYTES",
    "MAX_TAG_BYTES",
    "MESSAGE_IDLE_S",
    "Admission",
    "Wire",
    "encode_message",
    "message_frames",
    "parse",
    "peer_from_raw",
    "receive_message",
]

MAX_GROUP_SIZE = 256
MAX_ROUND_ID_BYTES = 64
MAX_REASON_CHARS = 200
MAX_BLOCK_SIZE = 1 << 20
"""Largest block of a blockwise codec accepted from the wire (the defaults are 256 and 4096)."""
MESSAGE_IDLE_S = 120.0
"""Longest wait between two frames of one round message: a stalled sender gives up its
buffer (and what it reserved) then. Generous: a 1 MiB frame over a slow uplink shared by a
round's other streams may take a minute, and a round that closes here ends the wait at
once anyway."""
_KIND = {Contribution: pb.CONTRIBUTION, Report: pb.REPORT, Reduced: pb.REDUCED, Leave: pb.LEAVE}
_TYPE = {kind: cls for cls, kind in _KIND.items()}


class Wire:
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


def encode_message(message: Message) -> Wire:
    meta = pb.RoundMessage(round_id=message.round_id, kind=_KIND[type(message)], part=message.part)
    tensors: tuple[torch.Tensor, ...] = ()
    if isinstance(message, Report):
        meta.peers.extend(_raw(p) for p in sorted(message.accepted, key=_raw))
        for peer, reason in message.rejected.items():
            meta.rejected.add(peer_id=_raw(peer), reason=reason[:MAX_REASON_CHARS])
    elif isinstance(message, Leave):
        pass  # the kind and part say it all
    else:
        meta.weight = message.weight
        if isinstance(message, Reduced):
            meta.peers.extend(_raw(p) for p in sorted(message.contributors, key=_raw))
            for peer, tag in sorted(message.tags.items(), key=lambda item: _raw(item[0])):
                meta.tagged.add(peer_id=_raw(peer), tag=tag)
        else:
            meta.tag = message.tag
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
    return Wire(meta_frame(meta), tuple(payloads), reuse=isinstance(message, Reduced))


def message_frames(message: Message) -> Iterator[Any]:
    """The frames of one ``Deliver`` stream carrying ``message``."""
    return encode_message(message).frames()


def _raw(peer: Member) -> bytes:
    if isinstance(peer, PeerID):
        return peer.raw
    raise TypeError(f"gRPC averaging members must be PeerIDs, got {type(peer).__name__}")


def peer_from_raw(raw: bytes) -> PeerID:
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
    if meta.codec == "sparse":
        payload = tuple(t.reshape(-1) for t in tensors)
        try:
            check_sparse(n, payload)
        except ValueError as exc:
            raise ProtocolViolation(f"malformed sparse part: {exc}") from None
        return Encoded("sparse", (n,), payload)
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
    peers = frozenset(peer_from_raw(p) for p in meta.peers)
    if meta.kind in (pb.LEAVE, pb.REPORT) and (meta.tag or meta.tagged):
        raise ProtocolViolation("only contributions and reduced parts carry tags")
    if meta.kind == pb.LEAVE:
        if tensors or peers or meta.rejected:
            raise ProtocolViolation("a leave message carries nothing but its part")
        return Leave(meta.round_id, sender, meta.part)
    if meta.kind == pb.REPORT:
        if tensors:
            raise ProtocolViolation("a report carries no tensors")
        rejected: dict[Member, str] = {
            peer_from_raw(r.peer_id): r.reason[:MAX_REASON_CHARS] for r in meta.rejected
        }
        return Report(meta.round_id, sender, meta.part, peers, rejected)
    if meta.kind not in (pb.CONTRIBUTION, pb.REDUCED):
        raise ProtocolViolation(f"unknown round message kind {meta.kind}")
    expected = {"none": (1,), "fp16": (1,), "int8": (2,), "int4": (2,), "sparse": (1, 2)}
    if len(tensors) not in expected.get(meta.codec, ()):
        raise ProtocolViolation(f"codec {meta.codec!r} with {len(tensors)} tensors")
    data = _check_payload(meta, tensors)
    if meta.kind == pb.CONTRIBUTION:
        if len(meta.tag) > MAX_TAG_BYTES or meta.tagged:
            raise ProtocolViolation("a contribution's tag is too long, or it tags others")
        return Contribution(meta.round_id, sender, meta.part, meta.weight, data, meta.tag)
    if meta.tag:
        raise ProtocolViolation("a reduced part carries no tag of its own")
    return Reduced(meta.round_id, sender, meta.part, peers, meta.weight, data, _tags(meta, peers))


def _tags(meta: pb.RoundMessage, peers: frozenset[PeerID]) -> dict[Member, bytes]:
    """A reduced part's contributor tags: each a contributor's, once, within bounds."""
    if len(meta.tagged) > len(peers):
        raise ProtocolViolation("more tags than contributors")
    tags: dict[Member, bytes] = {}
    for item in meta.tagged:
        peer = peer_from_raw(item.peer_id)
        if peer not in peers or peer in tags:
            raise ProtocolViolation("a tag for a peer not among the contributors, or twice")
        if not 0 < len(item.tag) <= MAX_TAG_BYTES:
            raise ProtocolViolation(f"a contributor tag of {len(item.tag)} bytes")
        tags[peer] = item.tag
    return tags


class Admission:
    """What one incoming round message may allocate, decided from its meta frame.

    The inbox must want the message (a member of the round, a part of the right size, not
    a repeat, see ``Inbox.check``) before any of its tensors is read; no tensor may exceed
    4 bytes per value of the part (fp32, the largest encoding); and bytes for a round not
    open here count against the inbox's pending bound while they are received.
    """

    def __init__(
        self, inbox: Inbox, pool: BufferPool, sender: PeerID, *, repeats: bool = False
    ) -> None:
        """``repeats``: let a message the inbox holds already through (it is then dropped
        on delivery): a reducer sends a client's pull stream again what it is not sure
        arrived, and refusing it ended the pull of everything after it."""
        self._inbox = inbox
        self._pool = pool
        self._sender = sender
        self._repeats = repeats
        self.reserved = 0
        self._marked: tuple[bytes, type, PeerID, int] | None = None
        self._watched: tuple[bytes, Callable[[], None]] | None = None

    def allocator(
        self, meta: pb.RoundMessage, on_forget: Callable[[], None] | None = None
    ) -> Callable[[int], bytearray]:
        """How the message's tensors are allocated, once the meta frame says it is wanted.
        ``on_forget()`` is called if its round is closed or dropped here meanwhile."""
        kind = _TYPE.get(meta.kind)
        if kind is None:
            raise ProtocolViolation(f"unknown round message kind {meta.kind}")
        # Bounded before the inbox remembers anything of it (its round id, its part).
        if not 0 < len(meta.round_id) <= MAX_ROUND_ID_BYTES:
            raise ProtocolViolation(f"round id of {len(meta.round_id)} bytes")
        if meta.part >= MAX_GROUP_SIZE:
            raise ProtocolViolation(f"part {meta.part} of a group of at most {MAX_GROUP_SIZE}")
        numel = None if kind in (Report, Leave) else meta.numel
        why = self._inbox.check(meta.round_id, kind, self._sender, meta.part, numel)
        if why is not None and not (why == REPEAT and self._repeats):
            raise ProtocolViolation(f"round message refused: {why}")
        if why is None:
            self._marked = (meta.round_id, kind, self._sender, meta.part)
            self._inbox.receiving(*self._marked)
        if on_forget is not None:
            self._watched = (meta.round_id, on_forget)
            self._inbox.watch(*self._watched)
        # Bytes of a round whose part sizes are not known here yet are bounded like those
        # of a round not open at all: its sizes cannot bound them.
        pending = not self._inbox.is_sized(meta.round_id)
        most = 4 * (numel or 0)

        def take(nbytes: int) -> bytearray:
            if nbytes > most:
                raise ProtocolViolation(f"a tensor of {nbytes} bytes for a part of {numel} values")
            if pending:
                self._inbox.reserve(nbytes, self._sender)
                self.reserved += nbytes
            return self._pool.take(nbytes)

        return take

    def release(self) -> None:
        """Give the pending bytes and the in-flight mark back (just before the message goes
        into the inbox)."""
        self._inbox.release(self.reserved, self._sender)
        self.reserved = 0
        if self._marked is not None:
            self._inbox.received(*self._marked)
            self._marked = None
        if self._watched is not None:
            self._inbox.unwatch(*self._watched)
            self._watched = None


async def receive_message(
    frames: AsyncIterator[Any],
    sender: PeerID,
    limits: TensorLimits,
    admission: Admission,
    *,
    idle_s: float = MESSAGE_IDLE_S,
) -> Message | None:
    """The next round message of ``frames`` (meta frame, then its tensors), or None when
    the stream ends before a meta frame. Raises ProtocolViolation on anything malformed or
    refused by ``admission`` (checked before a tensor is allocated), or when its round is
    closed or dropped here before it is whole; PeerTimeout when ``idle_s`` pass between two
    of its frames (the wait for the meta frame is not bounded: a pulled message may wait
    long to be posted)."""
    try:
        first = await frames.__anext__()
    except StopAsyncIteration:
        return None
    meta = pb.RoundMessage()
    if isinstance(first, Chunk) or first.WhichOneof("frame") != "meta":
        raise ProtocolViolation("a round message starts with a meta frame")
    try:
        if not first.meta.Unpack(meta):
            raise ProtocolViolation(f"meta frame is {first.meta.type_url}, not a RoundMessage")
    except DecodeError as exc:
        raise ProtocolViolation(f"malformed round message meta: {exc}") from None
    if meta.payload_tensors > 2:
        raise ProtocolViolation(f"{meta.payload_tensors} payload tensors (at most 2)")
    idle = IdleTimeout(idle_s)
    try:
        async with idle:
            take = admission.allocator(meta, on_forget=idle.expire)
            watched = _Progress(frames, idle)
            tensors = [
                await read_tensor_into_pool(watched, limits, take)
                for _ in range(meta.payload_tensors)
            ]
    except TimeoutError:
        if idle.expired:
            raise ProtocolViolation("round message refused: the round is over here") from None
        raise PeerTimeout(f"no frame of a round message for {idle_s:g} s") from None
    return parse(meta, sender, tensors)


class _Progress:
    """Frames, each noted as progress of an :class:`IdleTimeout`."""

    def __init__(self, frames: AsyncIterator[Any], idle: IdleTimeout) -> None:
        self._frames = frames
        self._idle = idle

    def __aiter__(self) -> _Progress:
        return self

    async def __anext__(self) -> Any:
        frame = await self._frames.__anext__()
        self._idle.progress()
        return frame
