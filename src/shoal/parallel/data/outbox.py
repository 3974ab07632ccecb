"""Messages waiting for members that cannot accept connections (client mode).

A reducer cannot dial a client behind a NAT, so what it would send there (reports and
results) waits here until the client's ``Averaging/Pull`` stream for the round takes it.
Posting does not wait for the client: a client that is slow to pull, or dead, must not
hold up the reducer's own round (clients reduce nothing, so nobody else needs what they
receive). A posted message stays until a pull stream has written it or its time to live
(the round's deadline) has passed; it keeps the buffers it views alive until then.

Bounds: at most ``max_slots`` (member, round) slots hold messages at once, at most
``max_waiting_slots`` more only have pull streams waiting, and at most
``max_pulls_per_member`` pull streams exist per member; a slot disappears when nobody
pulls from it and nothing is queued in it. Pulls waiting on empty slots never make a post
fail: any peer may pull a round that has not begun here, so they must not crowd out the
messages of real clients.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from shoal.errors import RemoteError
from shoal.net.aio import within
from shoal.net.identity import PeerID

__all__ = ["Outbox"]

T = TypeVar("T")
_Key = tuple[PeerID, bytes]


@dataclass(slots=True)
class _Slot(Generic[T]):
    queue: deque[tuple[T, float]] = field(default_factory=deque)
    """Items with the loop time they expire at, oldest first."""
    pullers: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    generation: int = 0
    """Bumped by each pull stream that attaches: only the newest takes items."""


class Outbox(Generic[T]):
    """Per (member, round) queues between a reducer's sends and a member's pull streams."""

    def __init__(
        self,
        *,
        max_slots: int = 256,
        max_waiting_slots: int | None = None,
        max_pulls_per_member: int = 8,
    ) -> None:
        self._slots: dict[_Key, _Slot[T]] = {}
        self._pulls: dict[PeerID, int] = {}
        self._max_slots = max_slots
        self._max_waiting = 4 * max_slots if max_waiting_slots is None else max_waiting_slots
        self._max_pulls = max_pulls_per_member

    def __len__(self) -> int:
        return len(self._slots)

    def queued(self) -> int:
        """Items waiting, over all slots."""
        return sum(len(slot.queue) for slot in self._slots.values())

    def _slot(self, key: _Key, *, for_post: bool) -> _Slot[T]:
        slot = self._slots.get(key)
        if slot is None:
            holding = sum(1 for s in self._slots.values() if s.queue)
            if for_post and holding >= self._max_slots:
                raise RemoteError(f"outbox full ({self._max_slots} member rounds waiting)")
            if not for_post and len(self._slots) - holding >= self._max_waiting:
                raise RemoteError(f"{self._max_waiting} pulls of empty rounds are waiting already")
            slot = self._slots[key] = _Slot()
        return slot

    def _release(self, key: _Key, slot: _Slot[T]) -> None:
        if not slot.pullers and not slot.queue and self._slots.get(key) is slot:
            del self._slots[key]

    def post(self, to: PeerID, round_id: bytes, item: T, ttl_s: float) -> None:
        """Queue ``item`` for ``to``'s pull streams of ``round_id`` for ``ttl_s`` at most.

        Raises:
            RemoteError: too many member rounds are waiting already.
        """
        key = (to, round_id)
        slot = self._slot(key, for_post=True)
        loop = asyncio.get_running_loop()
        expires = loop.time() + max(ttl_s, 0.0)
        slot.queue.append((item, expires))
        slot.ready.set()
        loop.call_later(max(ttl_s, 0.0), self._expire, key, expires)

    def _expire(self, key: _Key, due: float) -> None:
        """Drop what expired by ``due`` (the item this timer was set for) or by now: uvloop
        rounds timer delays to milliseconds and may fire a little before ``due``."""
        slot = self._slots.get(key)
        if slot is None:
            return
        until = max(due, asyncio.get_running_loop().time())
        # Not only from the front: an item put back (or posted with a longer time to live)
        # may sit before ones that expire sooner.
        if any(expires <= until for _, expires in slot.queue):
            slot.queue = deque(entry for entry in slot.queue if entry[1] > until)
        self._release(key, slot)

    def pull(self, member: PeerID, round_id: bytes, timeout_s: float) -> _Pull[T]:
        """A pull stream of ``member`` for ``round_id``, open for ``timeout_s`` at most
        (``async with outbox.pull(...) as stream``)."""
        return _Pull(self, member, round_id, timeout_s)

    def _attach(self, key: _Key) -> _Slot[T]:
        member = key[0]
        if self._pulls.get(member, 0) >= self._max_pulls:
            raise RemoteError(f"at most {self._max_pulls} pull streams per member")
        slot = self._slot(key, for_post=False)
        slot.pullers += 1
        self._pulls[member] = self._pulls.get(member, 0) + 1
        return slot

    def _detach(self, key: _Key, slot: _Slot[T]) -> None:
        slot.pullers -= 1
        member = key[0]
        left = self._pulls.get(member, 1) - 1
        if left:
            self._pulls[member] = left
        else:
            self._pulls.pop(member, None)
        self._release(key, slot)


class _Pull(Generic[T]):
    """One pull stream's view of a slot: ``next()`` gives queued items, oldest first."""

    def __init__(self, outbox: Outbox[T], member: PeerID, round_id: bytes, timeout_s: float):
        self._outbox = outbox
        self._key = (member, round_id)
        self._timeout_s = timeout_s
        self._slot: _Slot[T] | None = None
        self._deadline = 0.0
        self._taken: tuple[T, float] | None = None
        self._generation = 0

    async def __aenter__(self) -> _Pull[T]:
        self._slot = slot = self._outbox._attach(self._key)
        # A member reopens its pull after its stream broke. The old stream's end here may
        # not know yet (until keepalive tells, 30 s), and would take items into a dead
        # connection: it stops taking them now.
        slot.generation += 1
        self._generation = slot.generation
        slot.ready.set()
        self._deadline = asyncio.get_running_loop().time() + self._timeout_s
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._slot is not None
        self._outbox._detach(self._key, self._slot)

    async def next(self) -> T | None:
        """The next unexpired item, or None when the stream's time is up.

        If writing the item out fails, give it back (:meth:`put_back`) for the member's
        next pull stream.
        """
        slot = self._slot
        assert slot is not None
        loop = asyncio.get_running_loop()
        while True:
            if slot.generation != self._generation:
                return None  # a newer pull stream of the member took over
            while slot.queue:
                entry = slot.queue.popleft()
                if entry[1] > loop.time():
                    self._taken = entry
                    return entry[0]
            slot.ready.clear()
            remaining = self._deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                await within(slot.ready.wait(), remaining)
            except TimeoutError:
                return None

    def put_back(self) -> None:
        """Return the item last given by :meth:`next` to the front of the queue."""
        slot, entry, self._taken = self._slot, self._taken, None
        assert slot is not None
        if entry is not None and entry[1] > asyncio.get_running_loop().time():
            slot.queue.appendleft(entry)  # expired, it would wait for a timer long gone
            slot.ready.set()
