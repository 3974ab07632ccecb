"""What the all-reduce needs from a network, and the per-peer inbox it reads.

A :class:`RoundTransport` sends one message to one member within a timeout and raises
:class:`~shoal.errors.NetworkError` subclasses on failure. Incoming messages land in the
peer's :class:`Inbox`, keyed by round id: messages for a round that has not opened yet are
held (a bounded number of rounds, oldest dropped) so a fast peer's contribution is not
lost when it arrives before the slower peer has started the round.

Implementations: :class:`~shoal.parallel.data.memory.MemoryNetwork` (tests, fault
injection) and the gRPC ``Averaging`` service (``grpc_transport.py``).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from shoal.parallel.data.messages import Member, Message

__all__ = ["Inbox", "RoundTransport"]


class RoundTransport(Protocol):
    """Delivers messages to other members of a group."""

    me: Member
    inbox: Inbox

    async def send(self, to: Member, message: Message, timeout_s: float) -> None:
        """Deliver ``message`` into ``to``'s inbox; raises NetworkError on failure."""
        ...


class Inbox:
    """Messages received by one peer, grouped by round, with waits on predicates."""

    def __init__(self, *, max_pending_rounds: int = 8, max_messages_per_round: int = 4096):
        self._rounds: OrderedDict[bytes, list[Message]] = OrderedDict()
        self._open: set[bytes] = set()
        self._max_pending = max_pending_rounds
        self._max_messages = max_messages_per_round
        self._changed = asyncio.Event()
        self.dropped = 0

    def deliver(self, message: Message) -> bool:
        """Store a message; False when it was dropped (closed round or over a bound)."""
        rid = message.round_id
        box = self._rounds.get(rid)
        if box is None:
            pending = [r for r in self._rounds if r not in self._open]
            if len(pending) >= self._max_pending:
                del self._rounds[pending[0]]
            box = self._rounds[rid] = []
        if len(box) >= self._max_messages:
            self.dropped += 1
            return False
        box.append(message)
        self._changed.set()
        return True

    def open(self, round_id: bytes) -> None:
        self._open.add(round_id)
        self._rounds.setdefault(round_id, [])

    def close(self, round_id: bytes) -> None:
        """Forget a round; later messages for it are dropped as pending, then evicted."""
        self._open.discard(round_id)
        self._rounds.pop(round_id, None)

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
