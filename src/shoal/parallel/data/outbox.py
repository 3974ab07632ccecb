"""Messages waiting for members that cannot accept connections (client mode).

A reducer cannot dial a client behind a NAT, so what it would send there (reports and
results) waits here until the client's ``Averaging/Pull`` stream for the round takes it.
Posting does not wait for the client: a client that is slow to pull, or dead, must not
hold up the reducer's own round (clients reduce nothing, so nobody else needs what they
receive). A posted message stays until a pull stream has written it or its time to live
(the round's deadline) has passed; it keeps the buffers it views alive until then.

Writing is not receiving: a stream that broke on the client's side only (a NAT rebinding)
stays open here until keepalive tells, and what it takes meanwhile goes into a dead
connection. So a client that says how many messages it has received (``received`` of
:meth:`Outbox.pull`, numbered in the order they were posted) keeps what its streams wrote
after those until it reopens, and gets it again then; what it received is dropped.

Bounds: at most ``max_slots`` (member, round) slots hold messages at once, at most
``max_waiting_slots`` more only have pull streams waiting, and at most
``max_pulls_per_member`` pull streams exist per member; a slot disappears when nobody
pulls from it and nothing is queued in it. Pulls waiting on empty slots never make a post
fail: any peer may pull a round that has not begun here, so they must not crowd out the
messages of real clients.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from shoal.errors import RemoteError
from shoal.net.aio import within
from shoal.net.identity import PeerID

__all__ = ["Outbox"]

T = TypeVar("T")
_Key = tuple[PeerID, bytes]
_MAX_COUNTED = 4096
"""(member, round) post counts kept past their slots (more than the slots that can exist:
``max_slots`` + ``max_waiting_slots``, 1,280 by default), at a few bytes each."""


@dataclass(frozen=True, slots=True, eq=False)  # compared by identity
class _Entry(Generic[T]):
    seq: int
    """Its place among the slot's posts, from 0: what a client's received count counts."""
    item: T
    expires: float
    """Loop time."""


@dataclass(slots=True)
class _Slot(Generic[T]):
    queue: deque[_Entry[T]] = field(default_factory=deque)
    """Items not taken yet, in the order they were posted."""
    written: list[_Entry[T]] = field(default_factory=list)
    """Items taken by streams of a client that counts what it received: kept until it
    says it has them (or they expire), in case they went into a dead connection."""
    pullers: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    generation: int = 0
    """Bumped by each pull stream that attaches: only the newest takes items."""

    def holds(self) -> bool:
        return bool(self.queue or self.written)

    def requeue(self, entries: list[_Entry[T]]) -> None:
        """Put ``entries`` back among the queued ones, in the order they were posted."""
        if entries:
            self.queue = deque(sorted([*self.queue, *entries], key=lambda e: e.seq))
            self.ready.set()

    def resume(self, received: int) -> None:
        """A client that received the first ``received`` posts reopens: drop those, and
        queue again what was written after them."""
        written, self.written = self.written, []
        self.queue = deque(e for e in self.queue if e.seq >= received)
        self.requeue([e for e in written if e.seq >= received])


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
        self._posted: OrderedDict[_Key, int] = OrderedDict()
        """Posts so far per (member, round), kept after its slot goes (a slot is gone once
        nothing is held or pulled, and a client's count goes on across it: numbering a
        later post from 0 again had the client's count drop it)."""
        self._pulls: dict[PeerID, int] = {}
        self._max_slots = max_slots
        self._max_waiting = 4 * max_slots if max_waiting_slots is None else max_waiting_slots
        self._max_pulls = max_pulls_per_member

    def __len__(self) -> int:
        return len(self._slots)

    def queued(self) -> int:
        """Items waiting, over all slots."""
        return sum(len(slot.queue) for slot in self._slots.values())

    def unacknowledged(self) -> int:
        """Items written that their client has not said it received, over all slots."""
        return sum(len(slot.written) for slot in self._slots.values())

    def _slot(self, key: _Key, *, for_post: bool) -> _Slot[T]:
        slot = self._slots.get(key)
        if slot is None:
            holding = sum(1 for s in self._slots.values() if s.holds())
            if for_post and holding >= self._max_slots:
                holding -= self._forget_written(holding - self._max_slots + 1)
            if for_post and holding >= self._max_slots:
                raise RemoteError(f"outbox full ({self._max_slots} member rounds waiting)")
            if not for_post and len(self._slots) - holding >= self._max_waiting:
                raise RemoteError(f"{self._max_waiting} pulls of empty rounds are waiting already")
            slot = self._slots[key] = _Slot()
        return slot

    def _forget_written(self, count: int) -> int:
        """Free up to ``count`` slots that hold only what was written already, oldest
        first: a client whose stream did not break has it (new posts matter more than a
        second chance for those). Returns how many were freed."""
        freed = 0
        for key, slot in list(self._slots.items()):
            if freed == count:
                break
            if slot.written and not slot.queue:
                slot.written = []
                self._release(key, slot)
                freed += 1
        return freed

    def _release(self, key: _Key, slot: _Slot[T]) -> None:
        if not slot.pullers and not slot.holds() and self._slots.get(key) is slot:
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
        seq = self._posted.pop(key, 0)
        self._posted[key] = seq + 1  # the most recent last
        for _ in range(len(self._posted) - _MAX_COUNTED):
            oldest = next(iter(self._posted))
            if oldest in self._slots:  # still held or pulled: its count must go on
                self._posted.move_to_end(oldest)
            else:
                del self._posted[oldest]
        slot.queue.append(_Entry(seq, item, expires))
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
        if any(e.expires <= until for e in slot.queue):
            slot.queue = deque(e for e in slot.queue if e.expires > until)
        slot.written = [e for e in slot.written if e.expires > until]
        self._release(key, slot)

    def pull(
        self, member: PeerID, round_id: bytes, timeout_s: float, *, received: int | None = None
    ) -> _Pull[T]:
        """A pull stream of ``member`` for ``round_id``, open for ``timeout_s`` at most
        (``async with outbox.pull(...) as stream``).

        ``received``: how many of the round's posts to ``member`` it has received over its
        earlier streams. Given, the stream starts after them, with what earlier streams
        wrote after them again, and what this one writes is kept until the next count.
        None (a client that does not count): only what a stream failed to write comes
        again (:meth:`_Pull.put_back`).
        """
        return _Pull(self, member, round_id, timeout_s, received)

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

    def __init__(
        self,
        outbox: Outbox[T],
        member: PeerID,
        round_id: bytes,
        timeout_s: float,
        received: int | None,
    ):
        self._outbox = outbox
        self._key = (member, round_id)
        self._timeout_s = timeout_s
        self._received = received
        self._slot: _Slot[T] | None = None
        self._deadline = 0.0
        self._taken: _Entry[T] | None = None
        self._generation = 0

    async def __aenter__(self) -> _Pull[T]:
        self._slot = slot = self._outbox._attach(self._key)
        # A member reopens its pull after its stream broke. The old stream's end here may
        # not know yet (until keepalive tells, 30 s), and would take items into a dead
        # connection: it stops taking them now.
        slot.generation += 1
        self._generation = slot.generation
        if self._received is not None:
            slot.resume(self._received)
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
                if entry.expires > loop.time():
                    self._taken = entry
                    if self._received is not None:
                        slot.written.append(entry)
                    return entry.item
            slot.ready.clear()
            remaining = self._deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                await within(slot.ready.wait(), remaining)
            except TimeoutError:
                return None

    def put_back(self) -> None:
        """Queue the item last given by :meth:`next` again (its write failed), before those
        posted after it, unless a newer stream of the member dealt with it already."""
        slot, entry, self._taken = self._slot, self._taken, None
        assert slot is not None
        if entry is None:
            return
        if self._received is not None:
            if slot.generation != self._generation or entry not in slot.written:
                return  # a newer stream's count dropped it, or queued it again
            slot.written.remove(entry)
        if entry.expires > asyncio.get_running_loop().time():
            slot.requeue([entry])  # expired, it would wait for a timer long gone
