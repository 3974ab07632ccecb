"""The Kademlia routing table: k-buckets with liveness checks and replacement caches.

Pure decision code: no sockets, no clock reads (``now`` is passed in), no tasks. The node
performs the I/O the table asks for and reports the outcome back.

Rules:

* Bucket ``i`` holds contacts at XOR distance ``[2**i, 2**(i+1))``; each keeps at most ``k``
  contacts ordered least-recently-seen first.
* A contact seen again (it answered us, or it called us) moves to the tail.
* A newcomer for a full bucket goes into the bucket's replacement cache (most recent first,
  bounded) and ``observe`` returns the bucket's least-recently-seen contact: the node pings
  it, then calls ``ping_result``. Alive: it moves to the tail and the newcomer waits in the
  cache. Dead: it is dropped and the freshest replacement takes its place. At most one such
  check is pending per bucket.
* ``max_failures`` consecutive failed RPCs also drop a contact (and promote a replacement).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from shoal.dht.ids import ID_BITS, Contact, bucket_index

__all__ = ["RoutingTable"]


@dataclass(slots=True)
class _Entry:
    contact: Contact
    last_seen: float
    failures: int = 0


class RoutingTable:
    """k-buckets around ``own_id``."""

    def __init__(self, own_id: int, *, k: int, replacement_size: int, max_failures: int) -> None:
        self.own_id = own_id
        self.k = k
        self._replacement_size = replacement_size
        self._max_failures = max_failures
        self._buckets: dict[int, list[_Entry]] = {}
        self._replacements: dict[int, list[Contact]] = {}
        self._pending: dict[int, bytes] = {}  # bucket -> PeerID raw being liveness-checked
        self._touched: dict[int, float] = {}  # bucket -> last lookup time (for refresh)

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def __contains__(self, contact: Contact) -> bool:
        return self._find(contact) is not None

    def contacts(self) -> list[Contact]:
        return [e.contact for b in self._buckets.values() for e in b]

    def observe(self, contact: Contact, now: float) -> Contact | None:
        """Record that ``contact`` is alive. Returns a contact to ping, or None."""
        index = bucket_index(self.own_id, contact.node_id)
        if index < 0:
            return None
        bucket = self._buckets.setdefault(index, [])
        for pos, entry in enumerate(bucket):
            if entry.contact.peer_id == contact.peer_id:
                del bucket[pos]
                entry.contact, entry.last_seen, entry.failures = contact, now, 0
                bucket.append(entry)
                return None
        if len(bucket) < self.k:
            bucket.append(_Entry(contact, now))
            self._drop_replacement(index, contact)
            return None
        self._add_replacement(index, contact)
        if index in self._pending:
            return None
        oldest = bucket[0].contact
        self._pending[index] = oldest.peer_id.raw
        return oldest

    def ping_result(self, contact: Contact, alive: bool, now: float) -> None:
        """Outcome of the liveness check that ``observe`` asked for."""
        index = bucket_index(self.own_id, contact.node_id)
        if self._pending.get(index) == contact.peer_id.raw:
            del self._pending[index]
        if alive:
            self.observe(contact, now)
        else:
            self._remove(index, contact)

    def failed(self, contact: Contact) -> None:
        """An RPC to ``contact`` failed; drop it after ``max_failures`` in a row."""
        index = bucket_index(self.own_id, contact.node_id)
        self._drop_replacement(index, contact)
        entry = self._find(contact)
        if entry is None:
            return
        entry.failures += 1
        if entry.failures >= self._max_failures:
            self._remove(index, contact)

    def nearest(self, target: int, count: int, exclude: bytes | None = None) -> list[Contact]:
        """Up to ``count`` known contacts closest to ``target`` (excluding PeerID ``exclude``).

        Only the buckets that can hold the answer are scanned: the target's own bucket is
        nearest, then every lower bucket together, then higher buckets in increasing order.
        """
        home = bucket_index(self.own_id, target)
        pool: list[Contact] = []
        buckets = self._buckets
        if home >= 0:
            pool.extend(e.contact for e in buckets.get(home, ()))
        if len(pool) <= count:
            for index, bucket in buckets.items():
                if index < home:
                    pool.extend(e.contact for e in bucket)
        above = sorted(i for i in buckets if i > home)
        for index in above:
            if len(pool) > count:
                break
            pool.extend(e.contact for e in buckets[index])
        if exclude is not None:
            pool = [c for c in pool if c.peer_id.raw != exclude]
        if len(pool) > count:
            pool.sort(key=lambda c: c.node_id ^ target)
            del pool[count:]
            return pool
        pool.sort(key=lambda c: c.node_id ^ target)
        return pool

    def touch(self, target: int, now: float) -> None:
        """A lookup for ``target`` ran now; its bucket needs no refresh for a while."""
        self._touched[bucket_index(self.own_id, target)] = now

    def stale_buckets(self, now: float, interval_s: float, since: float) -> list[int]:
        """Buckets (from the nearest occupied one outward) with no lookup for ``interval_s``.

        ``since`` stands in for buckets never looked up (usually when the node started).
        """
        occupied = [i for i, b in self._buckets.items() if b]
        if not occupied:
            return []
        lowest = min(occupied)
        return [
            i for i in range(lowest, ID_BITS) if self._touched.get(i, since) <= now - interval_s
        ]

    def random_id_in_bucket(self, index: int, rng: random.Random) -> int:
        """A random ID whose distance from ``own_id`` falls in bucket ``index``."""
        offset = (1 << index) | rng.getrandbits(index) if index > 0 else 1
        return self.own_id ^ offset

    def _find(self, contact: Contact) -> _Entry | None:
        bucket = self._buckets.get(bucket_index(self.own_id, contact.node_id), [])
        for entry in bucket:
            if entry.contact.peer_id == contact.peer_id:
                return entry
        return None

    def _remove(self, index: int, contact: Contact) -> None:
        bucket = self._buckets.get(index)
        if not bucket:
            return
        kept = [e for e in bucket if e.contact.peer_id != contact.peer_id]
        if len(kept) == len(bucket):
            return
        bucket[:] = kept
        replacements = self._replacements.get(index)
        if replacements:
            bucket.append(_Entry(replacements.pop(0), last_seen=-float("inf")))
        if not bucket:
            del self._buckets[index]

    def _add_replacement(self, index: int, contact: Contact) -> None:
        cache = self._replacements.setdefault(index, [])
        cache[:] = [c for c in cache if c.peer_id != contact.peer_id]
        cache.insert(0, contact)
        del cache[self._replacement_size :]

    def _drop_replacement(self, index: int, contact: Contact) -> None:
        cache = self._replacements.get(index)
        if cache:
            cache[:] = [c for c in cache if c.peer_id != contact.peer_id]
            if not cache:
                del self._replacements[index]
