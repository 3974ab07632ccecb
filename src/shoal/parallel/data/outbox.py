"""Messages waiting for members that cannot accept connections (client mode).

A reducer cannot dial a client behind a NAT, so what it would send there (reports and
results) waits here until the client's ``Averaging/Pull`` stream for the round takes it.
The sender's ``send`` stays pending until its message has been written to that stream or
its timeout passes, exactly as a pushed send waits for the receiver, so a round cannot end
(and recycle the buffers a message views) while the message is still queued.

Bounds: at most ``max_slots`` (member, round) slots exist at once and at most
``max_pulls_per_member`` pull streams per member; a slot disappears when nobody waits on it
and nothing is queued in it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from shoal.errors import PeerTimeout, RemoteError
from shoal.net.identity import PeerID

__all__ = ["Outbox"]

T = TypeVar("T")
_Key = tuple[PeerID, bytes]


@dataclass(slots=True)
class _Slot(Generic[T]):
    queue: deque[tuple[T, asyncio.Future[None]]] = field(default_factory=deque)
    senders: int = 0
    pullers: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class Outbox(Generic[T]):
    """Per (member, round) queues between ``send`` and a member's pull streams."""

    def __init__(self, *, max_slots: int = 256, max_pulls_per_member: int = 8) -> None:
        self._slots: dict[_Key, _Slot[T]] = {}
        self._pulls: dict[PeerID, int] = {}
        self._max_slots = max_slots
        self._max_pulls = max_pulls_per_member

    def __len__(self) -> int:
        return len(self._slots)

    def _slot(self, key: _Key) -> _Slot[T]:
        slot = self._slots.get(key)
        if slot is None:
            if len(self._slots) >= self._max_slots:
                raise RemoteError(f"outbox full ({self._max_slots} member rounds waiting)")
            slot = self._slots[key] = _Slot()
        return slot

    def _release(self, key: _Key, slot: _Slot[T]) -> None:
        if not slot.senders and not slot.pullers and not slot.queue:
            self._slots.pop(key, None)

    async def send(self, to: PeerID, round_id: bytes, item: T, timeout_s: float) -> None:
        """Queue ``item`` for ``to``; return once a pull stream has taken it.

        Raises:
            PeerTimeout: ``to`` did not pull it within ``timeout_s`` (it is withdrawn).
            RemoteError: too many member rounds are waiting already.
        """
        key = (to, round_id)
        slot = self._slot(key)
        taken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (item, taken)
        slot.queue.append(entry)
        slot.senders += 1
        slot.ready.set()
        try:
            await asyncio.wait_for(asyncio.shield(taken), max(timeout_s, 0.0))
        except TimeoutError:
            raise PeerTimeout(
                f"the client did not pull the message within {timeout_s:.1f} s", peer=str(to)
            ) from None
        finally:
            if not taken.done():
                taken.cancel()  # withdrawn
                with contextlib.suppress(ValueError):  # unless a pull holds it right now
                    slot.queue.remove(entry)
            slot.senders -= 1
            self._release(key, slot)

    def pull(self, member: PeerID, round_id: bytes, timeout_s: float) -> _Pull[T]:
        """A pull stream of ``member`` for ``round_id``, open for ``timeout_s`` at most
        (``async with outbox.pull(...) as stream``)."""
        return _Pull(self, member, round_id, timeout_s)

    def _attach(self, key: _Key) -> _Slot[T]:
        member = key[0]
        if self._pulls.get(member, 0) >= self._max_pulls:
            raise RemoteError(f"at most {self._max_pulls} pull streams per member")
        slot = self._slot(key)
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

    async def __aenter__(self) -> _Pull[T]:
        self._slot = self._outbox._attach(self._key)
        self._deadline = asyncio.get_running_loop().time() + self._timeout_s
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._slot is not None
        self._outbox._detach(self._key, self._slot)

    async def next(self) -> tuple[T, asyncio.Future[None]] | None:
        """The next item still wanted by its sender, or None when the stream's time is up.

        The caller writes the item out, then resolves the future (``set_result(None)``) if
        it is not done, which releases the sender; if the write fails, it gives the item
        back (:meth:`put_back`) for the member's next pull stream.
        """
        slot = self._slot
        assert slot is not None
        loop = asyncio.get_running_loop()
        while True:
            while slot.queue:
                item, taken = slot.queue.popleft()
                if not taken.done():
                    return item, taken
            slot.ready.clear()
            remaining = self._deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(slot.ready.wait(), remaining)
            except TimeoutError:
                return None

    def put_back(self, item: T, taken: asyncio.Future[None]) -> None:
        """Return an item that could not be written, to the front of the queue."""
        slot = self._slot
        assert slot is not None
        if not taken.done():
            slot.queue.appendleft((item, taken))
            slot.ready.set()
