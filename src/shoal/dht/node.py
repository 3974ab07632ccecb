"""A DHT node: routing table + record store + the four RPC handlers + the public API.

Protocol code only: it talks through a ``DHTTransport`` and answers as a ``DHTHandler``, so
the same node runs over the in-memory simulator and over gRPC. Two clocks are injected:
the event loop's monotonic time for deadlines, and ``wall_clock`` (Unix seconds, shared
meaning across machines) for record expiry.

Public API (all coroutines run on the network loop):

* ``await node.bootstrap(addresses)``: join through any of several addresses.
* ``await node.store(key, value, expires_at, subkey=None) -> int``: replicas that accepted.
* ``await node.get(key)``: the freshest value (plain key), ``{subkey: value}`` (dictionary
  key) or None. ``get_records`` returns the validated records themselves.
* ``await node.close()``: stop maintenance and every owned task; idempotent, bounded.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence

from shoal.dht.bootstrap import BOOTSTRAP_RETRY, REJOIN_RETRY, join
from shoal.dht.config import DHTConfig
from shoal.dht.ids import Contact, location_of
from shoal.dht.lookup import LookupResult, iterative_lookup
from shoal.dht.maintenance import maintain
from shoal.dht.record import Record, sign_record, validate
from shoal.dht.routing import RoutingTable
from shoal.dht.storage import RecordStore
from shoal.dht.transport import DHTTransport, FindValueAnswer, StoreAnswer
from shoal.errors import ConfigError, NetworkError, PeerUnavailable
from shoal.net.config import RetryPolicy
from shoal.net.identity import PEER_ID_BYTES, Identity, PeerID
from shoal.net.tasks import TaskSet

__all__ = ["DHTNode", "freshest_by_subkey", "merge_records"]


def freshest_by_subkey(records: Sequence[Record]) -> dict[bytes, Record]:
    """Per subkey, the record the DHT keeps: the one that expires last (ties: signature)."""
    best: dict[bytes, Record] = {}
    for rec in records:
        old = best.get(rec.subkey)
        if old is None or (rec.expires_at, rec.signature) > (old.expires_at, old.signature):
            best[rec.subkey] = rec
    return best


def merge_records(records: Sequence[Record]) -> bytes | dict[bytes, bytes] | None:
    """Freshest value per slot: plain key -> bytes, dictionary key -> {subkey: value}."""
    if not records:
        return None
    best = freshest_by_subkey(records)
    if b"" in best and len(best) == 1:
        return best[b""].value
    return {sub: rec.value for sub, rec in best.items() if sub}


class DHTNode:
    """One Kademlia participant. ``address`` None makes a client-only node (serves nothing)."""

    def __init__(
        self,
        identity: Identity,
        transport: DHTTransport,
        *,
        address: str | None,
        config: DHTConfig | None = None,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.identity = identity
        self.config = config or DHTConfig()
        self.transport = transport
        self.contact = Contact(identity.peer_id, address) if address else None
        self.wall_clock = wall_clock
        self.rng = rng or random.Random()
        self.table = RoutingTable(
            int.from_bytes(identity.peer_id.digest(), "big"),
            k=self.config.k,
            replacement_size=self.config.replacement_cache_size,
            max_failures=self.config.max_failures,
        )
        self.storage = RecordStore(self.config.limits)
        self.published: dict[tuple[bytes, bytes], tuple[Record, float]] = {}
        """Records this node wrote, with the loop time of their last publication."""
        self.tasks = TaskSet(f"dht {identity.peer_id.short()}", failure_log_level=logging.WARNING)
        self.started_at = 0.0
        """Loop time of ``start`` (buckets never looked up count as refreshed then)."""
        self.seeds: tuple[str, ...] = ()
        """Bootstrap addresses of the last join (even a failed one); maintenance re-joins
        through them."""
        self.seed_peers: dict[str, PeerID] = {}
        """Seed address -> the peer that last answered there: while one is missing from
        the routing table (it restarted, or failed and was dropped), maintenance pings the
        seeds sooner. A seed restarted under a new identity replaces its old one."""
        self.joined_at = 0.0
        """Loop time of the last join attempt through ``seeds``."""
        self._closed = False

    # ----------------------------------------------------------------- handlers
    def handle_ping(self, caller: Contact | None) -> Contact:
        self._observe(caller)
        if self.contact is None:
            raise ConfigError("a client-only DHT node cannot answer pings")
        return self.contact

    def handle_store(self, caller: Contact | None, records: Sequence[Record]) -> StoreAnswer:
        self._observe(caller)
        now = self.wall_clock()
        limit = self.config.limits.max_records_per_message
        return StoreAnswer([self.storage.put(rec, now) for rec in records[:limit]])

    def handle_find_node(self, caller: Contact | None, target: int) -> list[Contact]:
        self._observe(caller)
        exclude = caller.peer_id.raw if caller else None
        return self.table.nearest(target, self.config.k, exclude=exclude)

    def handle_find_value(self, caller: Contact | None, location: int) -> FindValueAnswer:
        records = self.storage.get(location, self.wall_clock())
        limits = self.config.limits
        if len(records) > limits.max_records_per_message or (
            sum(r.size_bytes for r in records) > limits.max_answer_bytes
        ):
            records = _writers_in_turn(records)
            del records[limits.max_records_per_message :]
            total = 0
            for i, record in enumerate(records):
                total += record.size_bytes
                if total > limits.max_answer_bytes:
                    del records[i:]
                    break
        return FindValueAnswer(records, self.handle_find_node(caller, location))

    # ---------------------------------------------------------------- public API
    async def bootstrap(self, addresses: Sequence[str], policy: RetryPolicy | None = None) -> int:
        """Join via any answering address, then look up our own ID; returns table size.

        The addresses are kept even when none answers: maintenance keeps trying them."""
        self.seeds = tuple(addresses)
        self.joined_at = asyncio.get_running_loop().time()
        contacts = await join(self, addresses, policy or BOOTSTRAP_RETRY)
        self._met_seeds(contacts)
        await self.lookup(self.table.own_id)
        return len(self.table)

    async def rejoin(self, *, lookup: bool = True) -> bool:
        """One quick join through ``seeds`` (see ``DHTConfig.rejoin_interval_s``), then a
        lookup of our own ID unless ``lookup`` is False.

        Returns whether any seed answered; never raises for unreachable seeds.
        """
        self.joined_at = asyncio.get_running_loop().time()
        if not self.seeds:
            return False
        try:
            contacts = await join(self, self.seeds, REJOIN_RETRY)
        except PeerUnavailable:
            return False
        self._met_seeds(contacts)
        if lookup:
            await self.lookup(self.table.own_id)
        return True

    def seeds_missing(self) -> bool:
        """Whether a seed never answered, or a peer that answered at one is not in the
        routing table now. A seed peer restarted with an empty table (it joined through
        nobody) learns of the swarm only from the peers that joined through it."""
        if not self.seeds:
            return False
        known = {c.peer_id for c in self.table.contacts()}
        return not self.seed_peers or not set(self.seed_peers.values()) <= known

    def _met_seeds(self, contacts: Sequence[Contact]) -> None:
        for contact in contacts:
            self._observe(contact)
        # Kept across joins: a seed peer that did not answer this time (it is restarting)
        # is still one to look for.
        self.seed_peers.update({c.address: c.peer_id for c in contacts})

    async def store(
        self, key: bytes, value: bytes, expires_at: float, subkey: bytes | None = None
    ) -> int:
        """Sign and store at the k nodes closest to ``key``; returns how many accepted.

        ``subkey`` (for dictionary keys) is appended to our PeerID to make an owned subkey.
        Raises ConfigError when the record breaks the limits or is already expired.
        """
        sub = b"" if subkey is None else self.identity.peer_id.raw + subkey
        record = sign_record(self.identity, key, value, expires_at, sub)
        reason = validate(record, self.wall_clock(), self.config.limits)
        if reason is not None:
            raise ConfigError(f"record for key {key[:32]!r} refused locally: {reason.value}")
        loop = asyncio.get_running_loop()
        self.published[(key, sub)] = (record, loop.time())
        return await self.publish(record)

    async def publish(self, record: Record) -> int:
        """Send an already signed record to the k nodes closest to its key."""
        return (await self._publish(record))[0]

    async def republish_held(self, record: Record) -> None:
        """Re-store a record we hold; drop it if we are no longer among its k closest."""
        stored, among = await self._publish(record)
        if not among and stored > 0:
            self.storage.discard(record)

    async def _publish(self, record: Record) -> tuple[int, bool]:
        location = location_of(record.key)
        found = await self.lookup(location)
        targets = found.closest[: self.config.k]
        stored = 0
        among = self.contact is not None and self._among_closest(location, targets)
        if among:
            stored += self.storage.put(record, self.wall_clock()) is None
        answers = await asyncio.gather(
            *(self._store_one(c, [record]) for c in targets), return_exceptions=True
        )
        for answer in answers:
            if isinstance(answer, StoreAnswer) and answer.results and answer.results[0] is None:
                stored += 1
        return stored, among

    async def get(self, key: bytes) -> bytes | dict[bytes, bytes] | None:
        """The freshest valid value(s) for ``key``, or None when nobody holds one."""
        return merge_records(await self.get_records(key))

    async def get_records(self, key: bytes, *, quorum: int | None = None) -> list[Record]:
        """Validated, unexpired records for ``key`` from the network and the local store."""
        return (await self.find_records(key, quorum=quorum))[0]

    async def find_records(
        self, key: bytes, *, quorum: int | None = None
    ) -> tuple[list[Record], LookupResult]:
        """``get_records`` plus the lookup that found them (hops, RPCs; for measurements)."""
        location = location_of(key)
        found = await self.lookup(location, find_value=True, quorum=quorum)
        now = self.wall_clock()
        unique = {r.signature: r for r in [*found.records, *self.storage.get(location, now)]}
        valid = [
            r
            for r in unique.values()
            if r.key == key and validate(r, now, self.config.limits) is None
        ]
        return valid, found

    async def lookup(
        self, target: int, *, find_value: bool = False, quorum: int | None = None
    ) -> LookupResult:
        cfg = self.config
        self.table.touch(target, asyncio.get_running_loop().time())
        return await iterative_lookup(
            self.transport,
            self.table.nearest(target, cfg.k),
            target,
            own_raw=self.identity.peer_id.raw,
            k=cfg.k,
            alpha=cfg.alpha,
            rpc_timeout_s=cfg.rpc_timeout_s,
            lookup_timeout_s=cfg.lookup_timeout_s,
            slow_rpc_s=cfg.slow_rpc_s,
            find_value=find_value,
            value_quorum=quorum or cfg.value_quorum,
            on_success=self._observe,
            on_failure=self.table.failed,
        )

    def start(self) -> None:
        """Start the maintenance task (expiry, republishing, bucket refresh)."""
        if self.tasks.closed:
            return
        self.started_at = asyncio.get_running_loop().time()
        self.tasks.spawn(maintain(self))

    async def close(self) -> None:
        """Cancel maintenance and owned tasks; safe to call twice, bounded by 2 s."""
        self._closed = True
        await self.tasks.close()

    # ----------------------------------------------------------------- internals
    async def _store_one(self, contact: Contact, records: list[Record]) -> StoreAnswer:
        try:
            answer = await self.transport.store(
                contact, records, timeout_s=self.config.rpc_timeout_s
            )
        except NetworkError:
            self.table.failed(contact)
            raise
        self._observe(contact)
        return answer

    def _among_closest(self, location: int, closest: list[Contact]) -> bool:
        if len(closest) < self.config.k:
            return True
        return self.table.own_id ^ location < closest[-1].node_id ^ location

    def _observe(self, contact: Contact | None) -> None:
        if contact is None or self._closed or len(contact.peer_id.raw) != PEER_ID_BYTES:
            return
        stale = self.table.observe(contact, asyncio.get_running_loop().time())
        if stale is not None:
            self.tasks.spawn(self._check_alive(stale))

    async def _check_alive(self, contact: Contact) -> None:
        try:
            await self.transport.ping(contact, timeout_s=self.config.rpc_timeout_s)
        except NetworkError:
            self.table.ping_result(contact, False, asyncio.get_running_loop().time())
        else:
            self.table.ping_result(contact, True, asyncio.get_running_loop().time())


def _writers_in_turn(records: list[Record]) -> list[Record]:
    """``records`` in the order an answer too small for all of them keeps them: each
    writer's freshest record first, then each one's second, and so on, the freshest first
    within each turn. A writer may own any number of subkeys under a key: freshest first
    alone, one writing hundreds of long-lived records hid everyone else's (a rendezvous
    board's readers then saw no other peer ready)."""
    turn_of: dict[bytes, int] = {}
    ranked = []
    for record in sorted(records, key=lambda r: (-r.expires_at, r.signature)):
        turn = turn_of.get(record.writer.raw, 0)
        turn_of[record.writer.raw] = turn + 1
        ranked.append((turn, record))
    ranked.sort(key=lambda entry: entry[0])  # stable: the freshest first within a turn
    return [record for _, record in ranked]
