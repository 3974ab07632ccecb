"""The all-reduce over ``shoal.net``: the ``Averaging`` gRPC service and its client side.

:class:`GrpcTransport` implements :class:`RoundTransport` for members identified by
:class:`~shoal.net.PeerID`. ``send`` opens one ``Averaging/Deliver`` stream per message
(its frames: ``wire.py``). :class:`AveragingService` receives them: what the inbox would
not keep is refused from the meta frame before anything is allocated, the sender is the
authenticated caller (never the message), and the message goes into the inbox.
Client-mode members are not dialed: they pull what is addressed to them with
``Averaging/Pull`` (see :class:`GrpcTransport`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Sequence, Set
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

from shoal.compress import Encoded
from shoal.errors import NetworkError, PeerTimeout, ProtocolViolation
from shoal.net.aio import within
from shoal.net.config import TensorLimits
from shoal.net.identity import PeerID
from shoal.net.proto.v1 import averaging_pb2 as pb
from shoal.net.proto.v1 import averaging_pb2_grpc as rpc
from shoal.net.proto.v1 import tensor_pb2
from shoal.net.runtime import NetRuntime
from shoal.net.server import current_caller
from shoal.parallel.data.averager import GroupSpec
from shoal.parallel.data.buffers import BufferPool
from shoal.parallel.data.matchmaking import Group
from shoal.parallel.data.messages import Member, Message
from shoal.parallel.data.outbox import Outbox
from shoal.parallel.data.transport import Inbox
from shoal.parallel.data.wire import (
    MAX_GROUP_SIZE,
    MAX_ROUND_ID_BYTES,
    MESSAGE_IDLE_S,
    Admission,
    Wire,
    encode_message,
    peer_from_raw,
    receive_message,
)

__all__ = [
    "MAX_BANDWIDTH_BPS",
    "MAX_GROUP_SIZE",
    "MIN_BANDWIDTH_BPS",
    "AveragingService",
    "GrpcTransport",
]

MIN_BANDWIDTH_BPS = 1e3
MAX_BANDWIDTH_BPS = 1e11
_RATE_SAMPLE_MIN_BYTES = 256 * 1024
"""Smaller sends measure latency, not bandwidth."""
_MAX_RATE_SAMPLES = 1024
"""Rate samples kept between two reads (a round makes a few per member)."""
MAX_PULL_S = 900.0
"""The longest a pull stream stays open, whatever deadline the client asks for."""
_PULL_ATTEMPTS = 5
_PULL_BACKOFF_S = 0.5
_MAX_PULLED_MESSAGES = 4 * MAX_GROUP_SIZE
"""A reducer sends a client one report and at most a few results per round."""
_log = logging.getLogger(__name__)


def _add_rate(rates: list[float], nbytes: int, took_s: float) -> None:
    """Note the rate of a transfer big enough to measure one (a bounded count of them)."""
    if nbytes >= _RATE_SAMPLE_MIN_BYTES and took_s > 0 and len(rates) < _MAX_RATE_SAMPLES:
        rates.append(8 * nbytes / took_s)


class _FirstFrameClock:
    """A frame stream that notes when its first frame arrived (loop time)."""

    def __init__(self, frames: AsyncIterator[Any]) -> None:
        self._frames = frames
        self.first_at: float | None = None

    def __aiter__(self) -> _FirstFrameClock:
        return self

    async def __anext__(self) -> Any:
        frame = await self._frames.__anext__()
        if self.first_at is None:
            self.first_at = time.perf_counter()  # a loop's clock may tick in ms
        return frame


async def _end_of(frames: AsyncIterator[Any]) -> None:
    """The stream ends after its one message (a sender appending more is refused: what
    follows would go unread, hiding the sender's bug or a second message)."""
    try:
        await within(frames.__anext__(), MESSAGE_IDLE_S)
    except StopAsyncIteration:
        return
    except TimeoutError:
        raise PeerTimeout(f"the stream did not end within {MESSAGE_IDLE_S:g} s") from None
    raise ProtocolViolation("frames after the round message")


def _payload(message: Message) -> tuple[torch.Tensor, ...]:
    data = getattr(message, "data", None)
    return () if data is None else data.payload if isinstance(data, Encoded) else (data,)


def _clamp(bps: float) -> float:
    return min(MAX_BANDWIDTH_BPS, max(MIN_BANDWIDTH_BPS, bps))


class AveragingService(rpc.AveragingServicer):
    """Receives round messages into ``inbox`` and serves ``outbox`` to pulling clients."""

    def __init__(
        self,
        runtime: NetRuntime,
        inbox: Inbox,
        outbox: Outbox[Wire],
        clients: dict[bytes, frozenset[Member]],
    ) -> None:
        self._limits = runtime.config.tensor_limits
        self._inbox = inbox
        self._outbox = outbox
        self._clients = clients  # the transport's: client members of the rounds under way
        self.pool = BufferPool()
        self.receive_rates: list[float] = []
        """bits/s of each big message received since the transport last took them."""

    async def Deliver(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> tensor_pb2.TensorAck:
        caller = current_caller()
        admission = Admission(self._inbox, self.pool, caller)
        frames = request_iterator.__aiter__()
        try:
            message = await self.receive_timed(frames, caller, self._limits, admission)
            if message is not None:
                await _end_of(frames)
        finally:
            admission.release()
        if message is None:
            raise ProtocolViolation("empty round message stream")
        self._inbox.deliver(message)
        tensors = _payload(message)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        return tensor_pb2.TensorAck(byte_length=nbytes, tensors=len(tensors))

    async def receive_timed(
        self, frames: AsyncIterator[Any], sender: PeerID, limits: TensorLimits, admission: Admission
    ) -> Message | None:
        """``receive_message``, noting the message's rate in ``receive_rates``: timed from
        its first frame (a pulled message may wait long for the reducer to post it)."""
        clock = _FirstFrameClock(frames)
        message = await receive_message(clock, sender, limits, admission)
        if message is not None and clock.first_at is not None:
            took = time.perf_counter() - clock.first_at
            nbytes = sum(t.numel() * t.element_size() for t in _payload(message))
            _add_rate(self.receive_rates, nbytes, took)
        return message

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
        received = request.received if request.HasField("received") else None
        pull = self._outbox.pull(caller, request.round_id, lifetime, received=received)
        async with pull as stream:
            while (wire := await stream.next()) is not None:
                try:
                    for frame in wire.frames():
                        yield frame
                except BaseException:
                    # The next pull stream sends it. Even when the last frame had gone out:
                    # whether it arrived is unknown, so it waits (until the round's deadline).
                    stream.put_back()
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
        self._outbox: Outbox[Wire] = Outbox()
        self._clients: dict[bytes, frozenset[Member]] = {}
        self._pulls: dict[bytes, list[asyncio.Task[None]]] = {}
        self.service = AveragingService(runtime, self.inbox, self._outbox, self._clients)
        runtime.add_servicer(rpc.add_AveragingServicer_to_server, self.service)
        GrpcTransport._shared[runtime] = self

    def uplink_sample(self) -> float | None:
        """The fastest send (bits/s) since the last call, or None; then forgets them.

        A peer's best stream in a round is bounded by its own uplink, while a slow receiver
        can only lower the others: the best one is the estimate of what it can send. Sends
        to several members run at once and split the link, so this is a share of the
        uplink, as :meth:`downlink_sample` is of the downlink: the two compare, which is
        what the shares need.
        """
        rates, self._send_rates = self._send_rates, []
        return max(rates) if rates else None

    def downlink_sample(self) -> float | None:
        """The fastest message received (bits/s) since the last call, or None; then forgets
        them (bounded by this peer's downlink, as sends are by its uplink), pulled results
        included."""
        rates, self.service.receive_rates = self.service.receive_rates, []
        return max(rates) if rates else None

    def join(self, group: Group) -> GroupSpec:
        """The all-reduce group for a matchmaking ``Group``; learns members' addresses.

        Shares are planned from the links the members announced, clamped to
        ``[MIN_BANDWIDTH_BPS, MAX_BANDWIDTH_BPS]`` (the planning stays in a sane range of
        rates; a downlink of 0, not measured, stays 0 and is taken as the uplink).
        Client-mode members reduce nothing.
        """
        members = []
        for entry in group.members:
            peer = peer_from_raw(entry.peer)
            if entry.address:
                self.set_address(peer, entry.address)
            members.append(peer)
        return GroupSpec(
            group.group_id,
            tuple(members),
            tuple(_clamp(e.uplink_bps) for e in group.members),
            tuple(e.client_mode for e in group.members),
            tuple(_clamp(e.downlink_bps) if e.downlink_bps else 0.0 for e in group.members),
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

        A broken stream is reopened up to ``_PULL_ATTEMPTS`` times before ``deadline``,
        saying how many messages arrived (the reducer sends again what it wrote after
        those); a reducer that sends anything malformed is not asked again (the round then
        misses its part and fails cleanly).
        """
        loop = asyncio.get_running_loop()
        limits = self.runtime.config.tensor_limits
        received = 0
        for attempt in range(_PULL_ATTEMPTS):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                stub = self._stub(reducer)
                request = pb.PullRequest(round_id=round_id, received=received)
                frames = stub.Pull(request, timeout_s=remaining)
                stream = frames.__aiter__()
                for _ in range(_MAX_PULLED_MESSAGES):
                    # What a broken stream's reducer was not sure we got comes again.
                    admission = Admission(self.inbox, self.service.pool, reducer, repeats=True)
                    try:
                        message = await self.service.receive_timed(
                            stream, reducer, limits, admission
                        )
                    finally:
                        admission.release()
                    if message is None:
                        return
                    if message.round_id != round_id:
                        raise ProtocolViolation("pulled a message of another round")
                    received += 1
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
            entry = self._inflight[id(message)] = [message, encode_message(message), 0]
        entry[2] += 1
        wire: Wire = entry[1]
        started = time.perf_counter()  # durations: uvloop's clock ticks in milliseconds
        try:
            if stub is None:  # the client takes it when it pulls; we do not wait for it
                self._outbox.post(to, message.round_id, wire, timeout_s)
                return
            await stub.Deliver(wire.frames(), timeout_s=max(timeout_s, 1e-3))
            nbytes = sum(view.nbytes for _, view in wire.tensors)
            took = time.perf_counter() - started
            _add_rate(self._send_rates, nbytes, took)
        finally:
            entry[2] -= 1
            if entry[2] == 0 and self._inflight.get(id(message)) is entry:
                del self._inflight[id(message)]
