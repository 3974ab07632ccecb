"""What the all-reduce needs from a network, and the per-peer inbox it reads.

A :class:`RoundTransport` sends one message to one member within a timeout and raises
:class:`~shoal.errors.NetworkError` subclasses on failure; ``begin``/``end`` bracket each
round, so a transport can serve members that cannot accept connections. Incoming messages
land in the peer's :class:`Inbox`, keyed by round id: messages for a round that has not
opened yet are held (a bounded number of rounds, oldest dropped) so a fast peer's
contribution is not lost when it arrives before the slower peer has started the round.

Implementations: :class:`~shoal.parallel.data.memory.MemoryNetwork` (tests, fault
injection) and the gRPC ``Averaging`` service (``grpc_transport.py``).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence, Set
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from shoal.compress import Encoded
from shoal.errors import ProtocolViolation
from shoal.parallel.data.messages import Leave, Member, Message, wire_numel

__all__ = ["Inbox", "RoundTransport"]


REPEAT = "a second message of the same kind, sender and part"
"""Why :meth:`Inbox.check` refuses a message it holds already."""


class RoundTransport(Protocol):
    """Delivers messages to other members of a group."""

    me: Member
    inbox: Inbox

    async def send(self, to: Member, message: Message, timeout_s: float) -> None:
        """Deliver ``message`` into ``to``'s inbox; raises NetworkError on failure."""
        ...

    def begin(
        self, round_id: bytes, members: Sequence[Member], clients: Set[Member], deadline: float
    ) -> None:
        """A round among ``members`` starts; ``clients`` (client mode) may be unreachable,
        so what is sent to them must travel over connections they open (``deadline`` is on
        the loop clock)."""
        ...

    async def end(self, round_id: bytes) -> None:
        """The round is over on this member (whatever its outcome)."""
        ...


def _nbytes(message: Message) -> int:
    data = getattr(message, "data", None)
    if isinstance(data, torch.Tensor):
        return data.numel() * data.element_size()
    if isinstance(data, Encoded):
        return data.wire_bytes
    return 0


def _key(message: Message) -> tuple[type, Member, int]:
    """What a round holds one of per sender: its kind and part (see :meth:`Inbox.check`)."""
    return type(message), message.sender, message.part


def _numel(message: Message) -> int | None:
    data = getattr(message, "data", None)
    return None if data is None else wire_numel(data)


@dataclass(frozen=True, slots=True)
class _Shape:
    """What an open round accepts: messages from ``members``, parts of ``part_sizes``."""

    members: frozenset[Member] | None
    part_sizes: tuple[int, ...] | None


class Inbox:
    """Messages received by one peer, grouped by round, with waits on predicates.

    Bounds: at most ``max_pending_rounds`` rounds not yet opened (oldest dropped first),
    ``max_pending_bytes`` of tensor data in them (counting data still being received, see
    :meth:`reserve`), ``max_messages_per_round`` per round, ``max_open_rounds`` open rounds
    (the oldest is closed when a caller opens more and never closes them); messages for the
    last ``remember_closed`` closed rounds are dropped on arrival. An open round keeps the
    first message of each (kind, sender, part) only, and, once it knows them (``open``
    with ``members`` / ``part_sizes``), only those from members with a part of the right
    size.
    """

    def __init__(
        self,
        *,
        max_pending_rounds: int = 8,
        max_pending_bytes: int = 1 << 30,
        max_messages_per_round: int = 4096,
        max_open_rounds: int = 64,
        remember_closed: int = 64,
    ) -> None:
        self._rounds: OrderedDict[bytes, list[Message]] = OrderedDict()
        self._pending_bytes: dict[bytes, int] = {}
        self._open: OrderedDict[bytes, _Shape] = OrderedDict()
        self._keys: dict[bytes, set[tuple[type, Member, int]]] = {}
        self._receiving: set[tuple[bytes, type, Member, int]] = set()
        self._began: dict[bytes, set[tuple[type, Member, int]]] = {}
        self._closed: OrderedDict[bytes, None] = OrderedDict()
        self._max_pending = max_pending_rounds
        self._max_pending_bytes = max_pending_bytes
        self._max_messages = max_messages_per_round
        self._max_open = max_open_rounds
        self._remember_closed = remember_closed
        self._waiters: set[asyncio.Future[None]] = set()
        self._reserved_by: dict[Member, int] = {}
        self._watchers: dict[bytes, set[Callable[[], None]]] = {}
        self._leave_aliases: OrderedDict[bytes, bytes] = OrderedDict()
        self.dropped = 0

    @property
    def _reserved(self) -> int:
        """Bytes being received for rounds not open here (every sender's)."""
        return sum(self._reserved_by.values())

    def is_open(self, round_id: bytes) -> bool:
        return round_id in self._open

    def is_sized(self, round_id: bytes) -> bool:
        """Open with its part sizes known (a round may open with its members first)."""
        shape = self._open.get(round_id)
        return shape is not None and shape.part_sizes is not None

    def check(
        self, round_id: bytes, kind: type, sender: Member, part: int, numel: int | None
    ) -> str | None:
        """Why a message with these fields would be dropped now, or None if it is welcome.

        Receivers call this before reading a message's tensors, so that what would be
        dropped is never allocated.
        """
        if round_id in self._closed:
            return "the round is over here"
        shape = self._open.get(round_id)
        if shape is not None:
            if shape.members is not None and sender not in shape.members:
                return "the sender is not a member of the round"
            sizes = shape.part_sizes
            if sizes is not None:
                if not 0 <= part < len(sizes):
                    return f"part {part} of a round with {len(sizes)} parts"
                if numel is not None and numel != sizes[part]:
                    return f"part {part} with {numel} values, not {sizes[part]}"
        if (kind, sender, part) in self._keys.get(round_id, ()):
            return REPEAT
        if (round_id, kind, sender, part) in self._receiving:
            return "the same kind, sender and part is being received already"
        return None

    def receiving(self, round_id: bytes, kind: type, sender: Member, part: int) -> None:
        """Mark a message as being received (its repeats are refused until :meth:`received`):
        parallel streams of one message would otherwise each pass :meth:`check`."""
        self._receiving.add((round_id, kind, sender, part))
        self._began.setdefault(round_id, set()).add((kind, sender, part))
        while len(self._began) > self._max_open + self._max_pending:  # bounded: any peer
            stale = next((r for r in self._began if r not in self._open), round_id)
            self._began.pop(stale)  # may stream to round ids that never open
            if stale == round_id:
                break

    def received(self, round_id: bytes, kind: type, sender: Member, part: int) -> None:
        self._receiving.discard((round_id, kind, sender, part))

    def arriving(self, round_id: bytes, kind: type, part: int) -> set[Member]:
        """The senders of a message of ``kind`` for ``part`` that began to arrive in this
        round, whether it is still arriving, arrived, or was cut off when its sender gave up
        (a sender stops at its own deadline, which may come before ours is read)."""
        began = self._began.get(round_id, ())
        return {s for k, s, p in began if k is kind and p == part}

    def reserve(self, nbytes: int, sender: Member) -> None:
        """Count ``nbytes`` being received from ``sender`` for a round not open yet against
        the pending bound, of which one sender may hold half (give them back with
        :meth:`release` before delivering the message): one peer announcing four 256 MiB
        parts and stalling held the whole bound, and every honest early contribution was
        refused. Half, not less: an honest part of a large model (300M fp32 values in a
        group of 4 is 300 MB) must still fit.

        Raises:
            ProtocolViolation: no room for that many pending bytes.
        """
        if self._reserved + sum(self._pending_bytes.values()) + nbytes > self._max_pending_bytes:
            raise ProtocolViolation(
                f"no room for {nbytes} more bytes of rounds not started here "
                f"(at most {self._max_pending_bytes})"
            )
        held = self._reserved_by.get(sender, 0)
        if held + nbytes > self._max_pending_bytes // 2:
            raise ProtocolViolation(
                f"{held + nbytes} bytes of rounds not started here from one sender (at most "
                f"{self._max_pending_bytes // 2})"
            )
        self._reserved_by[sender] = held + nbytes

    def release(self, nbytes: int, sender: Member) -> None:
        left = self._reserved_by.get(sender, 0) - nbytes
        if left > 0:
            self._reserved_by[sender] = left
        else:
            self._reserved_by.pop(sender, None)

    def watch(self, round_id: bytes, on_forget: Callable[[], None]) -> None:
        """Call ``on_forget()`` when ``round_id`` is closed or dropped (a message still being
        received for it is then not wanted: its receiver gives up instead of holding its
        buffer until the sender finishes or stalls out). Undo with :meth:`unwatch`."""
        self._watchers.setdefault(round_id, set()).add(on_forget)

    def unwatch(self, round_id: bytes, on_forget: Callable[[], None]) -> None:
        watchers = self._watchers.get(round_id)
        if watchers is not None:
            watchers.discard(on_forget)
            if not watchers:
                del self._watchers[round_id]

    def alias_leaves(self, confirmed_id: bytes, round_id: bytes) -> None:
        """Leaves sent for ``confirmed_id`` (a group as its members confirmed it) count for
        ``round_id`` (the part of it that went on under another id, when some members did
        not confirm), those held already included. A member stopped while it confirmed
        cannot know which part that is, and its leave named the group it confirmed: the
        others waited for it until their collect deadline. Bounded like open rounds."""
        self._leave_aliases[confirmed_id] = round_id
        self._leave_aliases.move_to_end(confirmed_id)
        while len(self._leave_aliases) > self._max_open:
            self._leave_aliases.popitem(last=False)
        held = self._rounds.get(confirmed_id, [])
        leaves = [m for m in held if isinstance(m, Leave)]
        if leaves:  # moved, not copied: that id never opens here, and would hold a slot
            kept: list[Message] = [m for m in held if not isinstance(m, Leave)]
            if kept:
                self._rounds[confirmed_id] = kept
                self._keys[confirmed_id] = {_key(m) for m in kept}
            else:
                self._forget(confirmed_id)
        for leave in leaves:
            self.deliver(leave)

    def deliver(self, message: Message) -> bool:
        """Store a message; False when it was dropped (see :meth:`check`, or a bound)."""
        alias = self._leave_aliases.get(message.round_id)
        if alias is not None and isinstance(message, Leave):
            # Index 0, which every round has: the sender's index in the confirmed group
            # may be past the end of the smaller round (who leaves is the sender).
            message = replace(message, round_id=alias, part=0)
        rid = message.round_id
        if self.check(rid, type(message), message.sender, message.part, _numel(message)):
            self.dropped += 1
            return False
        box = self._rounds.get(rid)
        if rid not in self._open:
            size = _nbytes(message)
            if size + self._reserved + sum(self._pending_bytes.values()) > self._max_pending_bytes:
                self.dropped += 1
                return False
            if box is None:
                pending = [r for r in self._rounds if r not in self._open]
                if len(pending) >= self._max_pending:
                    self._forget(pending[0])
            self._pending_bytes[rid] = self._pending_bytes.get(rid, 0) + size
        if box is None:
            box = self._rounds[rid] = []
        if len(box) >= self._max_messages:
            self.dropped += 1
            return False
        box.append(message)
        self._keys.setdefault(rid, set()).add(_key(message))
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        return True

    def open(
        self,
        round_id: bytes,
        members: Collection[Member] | None = None,
        part_sizes: Sequence[int] | None = None,
    ) -> None:
        """Start keeping ``round_id``'s messages without the pending bounds; with
        ``members`` / ``part_sizes``, drop (now and from then on) what does not fit them."""
        shape = self._open.pop(round_id, None)
        if members is None and shape is not None:
            members = shape.members
        if part_sizes is None and shape is not None:
            part_sizes = shape.part_sizes
        self._open[round_id] = _Shape(
            None if members is None else frozenset(members),
            None if part_sizes is None else tuple(part_sizes),
        )
        self._pending_bytes.pop(round_id, None)
        self._closed.pop(round_id, None)
        kept = self._rounds.pop(round_id, [])
        self._rounds[round_id] = []
        self._keys.pop(round_id, None)
        for message in kept:
            self.deliver(message)
        while len(self._open) > self._max_open:
            self.close(next(iter(self._open)))

    def close(self, round_id: bytes) -> None:
        """Forget a round; messages for it that arrive later are dropped."""
        self._open.pop(round_id, None)
        self._forget(round_id)
        self._closed[round_id] = None
        while len(self._closed) > self._remember_closed:
            self._closed.popitem(last=False)

    def _forget(self, round_id: bytes) -> None:
        self._rounds.pop(round_id, None)
        self._pending_bytes.pop(round_id, None)
        self._keys.pop(round_id, None)
        self._began.pop(round_id, None)
        for on_forget in self._watchers.pop(round_id, ()):
            on_forget()

    def messages(self, round_id: bytes) -> list[Message]:
        return self._rounds.get(round_id, [])

    async def wait_until(self, predicate: Callable[[], bool], deadline: float) -> bool:
        """Wait until ``predicate()`` holds or the loop clock passes ``deadline``.

        Each wait has its own future, set by every delivery: concurrent rounds sharing the
        inbox cannot consume one another's wake-ups.
        """
        loop = asyncio.get_running_loop()
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.add(waiter)
            try:
                # Not wait_for: on Python 3.11 it drops a cancellation that arrives as the
                # waiter completes, and a stopping peer's round would then run on.
                await asyncio.wait((waiter,), timeout=remaining)
            finally:
                self._waiters.discard(waiter)
            if not waiter.done():
                return predicate()
        return True
