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
from collections.abc import Callable, Sequence, Set
from typing import Protocol

import torch

from shoal.compress import Encoded
from shoal.parallel.data.messages import Member, Message

__all__ = ["Inbox", "RoundTransport"]


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


class Inbox:
    """Messages received by one peer, grouped by round, with waits on predicates.

    Bounds: at most ``max_pending_rounds`` rounds not yet opened (oldest dropped first),
    ``max_pending_bytes`` of tensor data in them, ``max_messages_per_round`` per round;
    messages for the last ``remember_closed`` closed rounds are dropped on arrival.
    """

    def __init__(
        self,
        *,
        max_pending_rounds: int = 8,
        max_pending_bytes: int = 1 << 30,
        max_messages_per_round: int = 4096,
        remember_closed: int = 64,
    ) -> None:
        self._rounds: OrderedDict[bytes, list[Message]] = OrderedDict()
        self._pending_bytes: dict[bytes, int] = {}
        self._open: set[bytes] = set()
        self._closed: OrderedDict[bytes, None] = OrderedDict()
        self._max_pending = max_pending_rounds
        self._max_pending_bytes = max_pending_bytes
        self._max_messages = max_messages_per_round
        self._remember_closed = remember_closed
        self._changed = asyncio.Event()
        self.dropped = 0

    def deliver(self, message: Message) -> bool:
        """Store a message; False when it was dropped (closed round or over a bound)."""
        rid = message.round_id
        if rid in self._closed:
            self.dropped += 1
            return False
        box = self._rounds.get(rid)
        if rid not in self._open:
            size = _nbytes(message)
            if size + sum(self._pending_bytes.values()) > self._max_pending_bytes:
                self.dropped += 1
                return False
            if box is None:
                pending = [r for r in self._rounds if r not in self._open]
                if len(pending) >= self._max_pending:
                    del self._rounds[pending[0]]
                    self._pending_bytes.pop(pending[0], None)
            self._pending_bytes[rid] = self._pending_bytes.get(rid, 0) + size
        if box is None:
            box = self._rounds[rid] = []
        if len(box) >= self._max_messages:
            self.dropped += 1
            return False
        box.append(message)
        self._changed.set()
        return True

    def open(self, round_id: bytes) -> None:
        self._open.add(round_id)
        self._pending_bytes.pop(round_id, None)
        self._closed.pop(round_id, None)
        self._rounds.setdefault(round_id, [])

    def close(self, round_id: bytes) -> None:
        """Forget a round; messages for it that arrive later are dropped."""
        self._open.discard(round_id)
        self._rounds.pop(round_id, None)
        self._pending_bytes.pop(round_id, None)
        self._closed[round_id] = None
        while len(self._closed) > self._remember_closed:
            self._closed.popitem(last=False)

    def messages(self, round_id: bytes) -> list[Message]:
        return self._rounds.get(round_id, [])

    async def wait_until(self, predicate: Callable[[], bool], deadline: float) -> bool:
        """Wait until ``predicate()`` holds or the loop clock passes ``deadline``."""
        loop = asyncio.get_running_loop()
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._changed.clear()
            if predicate():
                return True
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return predicate()
        return True
