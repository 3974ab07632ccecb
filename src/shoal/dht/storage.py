"""A node's bounded record store (pure: no I/O, time passed in).

Layout: ``location -> {(subkey, writer): entry}``; one record per (key, subkey, writer) slot.

Conflict rule: for the same slot the record with the later ``expires_at`` wins; on a tie the
one with the larger signature bytes wins, so every replica converges on the same record
whatever order the writes arrive in. A write that loses is refused as ``STALE``.

Bounds: ``RecordLimits.max_records`` and ``max_bytes``. When a new record does not fit, the
records that expire soonest are evicted first; if the newcomer itself expires no later than
everything that would have to go, it is refused as ``STORAGE_FULL`` (a node never drops
long-lived data for shorter-lived data).

Each entry remembers when it was last (re)stored, which drives holder republishing: a
record re-stored by someone else within the interval need not be republished by us.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass

from shoal.dht.config import RecordLimits
from shoal.dht.ids import location_of
from shoal.dht.record import Record, Rejection, validate

__all__ = ["RecordStore"]

_Slot = tuple[bytes, bytes]  # (subkey, writer raw)


@dataclass(slots=True)
class _Entry:
    record: Record
    stored_at: float


class RecordStore:
    """Bounded storage with expiry, the conflict rule above and republish bookkeeping."""

    def __init__(self, limits: RecordLimits) -> None:
        self._limits = limits
        self._by_location: dict[int, dict[_Slot, _Entry]] = {}
        self._heap: list[tuple[float, int, _Slot]] = []  # lazy: stale items skipped on pop
        self._count = 0
        self._bytes = 0

    def __len__(self) -> int:
        return self._count

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def put(self, record: Record, now: float) -> Rejection | None:
        """Validate and store ``record``; None on success, else why it was refused."""
        location = location_of(record.key)
        slot: _Slot = (record.subkey, record.writer.raw)
        slots = self._by_location.get(location)
        old = slots.get(slot) if slots else None
        if old is not None and old.record == record:
            if record.expires_at <= now:
                return Rejection.EXPIRED
            old.stored_at = now  # identical re-store: already verified, just refresh
            return None
        if old is not None and (old.record.expires_at, old.record.signature) >= (
            record.expires_at,
            record.signature,
        ):
            return Rejection.STALE
        reason = validate(record, now, self._limits)
        if reason is not None:
            return reason
        freed = old.record.size_bytes if old is not None else 0
        if not self._make_room(record, now, extra_records=0 if old else 1, freed_bytes=freed):
            return Rejection.STORAGE_FULL
        slots = self._by_location.setdefault(location, {})
        old = slots.get(slot)  # eviction may have removed it
        if old is not None:
            self._count -= 1
            self._bytes -= old.record.size_bytes
        slots[slot] = _Entry(record, now)
        self._count += 1
        self._bytes += record.size_bytes
        heapq.heappush(self._heap, (record.expires_at, location, slot))
        return None

    def get(self, location: int, now: float) -> list[Record]:
        """Unexpired records at ``location``."""
        slots = self._by_location.get(location)
        if not slots:
            return []
        return [e.record for e in slots.values() if e.record.expires_at > now]

    def expire(self, now: float) -> int:
        """Drop every record that expired at or before ``now``; returns how many."""
        dropped = 0
        while self._heap and self._heap[0][0] <= now:
            if self._pop_min():
                dropped += 1
        return dropped

    def due_for_republish(self, now: float, interval_s: float) -> list[Record]:
        """Records not (re)stored for ``interval_s``; marks them as republished now."""
        due = []
        for slots in self._by_location.values():
            for entry in slots.values():
                if entry.stored_at <= now - interval_s and entry.record.expires_at > now:
                    entry.stored_at = now
                    due.append(entry.record)
        return due

    def discard(self, record: Record) -> bool:
        """Remove exactly this record if stored; True when it was."""
        location = location_of(record.key)
        slots = self._by_location.get(location)
        slot: _Slot = (record.subkey, record.writer.raw)
        entry = slots.get(slot) if slots else None
        if entry is None or entry.record != record:
            return False
        del slots[slot]  # type: ignore[union-attr]
        if not slots:
            del self._by_location[location]
        self._count -= 1
        self._bytes -= record.size_bytes
        return True  # its heap item turns stale and is skipped later

    def records(self) -> Iterator[Record]:
        for slots in self._by_location.values():
            for entry in slots.values():
                yield entry.record

    def _make_room(
        self, record: Record, now: float, *, extra_records: int, freed_bytes: int
    ) -> bool:
        lim = self._limits
        need_bytes = record.size_bytes - freed_bytes
        while (
            self._count + extra_records > lim.max_records
            or self._bytes + need_bytes > lim.max_bytes
        ):
            self._compact_heap()
            if not self._heap:
                return False
            soonest = self._heap[0][0]
            if soonest > now and soonest >= record.expires_at:
                return False
            self._pop_min()
        return True

    def _pop_min(self) -> bool:
        """Remove the heap's minimum if it is still live; True if a record was removed."""
        expires_at, location, slot = heapq.heappop(self._heap)
        slots = self._by_location.get(location)
        entry = slots.get(slot) if slots else None
        if entry is None or entry.record.expires_at != expires_at:
            return False
        del slots[slot]  # type: ignore[union-attr]
        if not slots:
            del self._by_location[location]
        self._count -= 1
        self._bytes -= entry.record.size_bytes
        return True

    def _compact_heap(self) -> None:
        """Drop stale heap items at the top so ``heap[0]`` is a live record."""
        while self._heap:
            expires_at, location, slot = self._heap[0]
            slots = self._by_location.get(location)
            entry = slots.get(slot) if slots else None
            if entry is not None and entry.record.expires_at == expires_at:
                return
            heapq.heappop(self._heap)
