"""Iterative lookup against a scripted transport: dead contacts, slow lanes, deadlines."""

import asyncio

from shoal.dht.ids import Contact
from shoal.dht.lookup import iterative_lookup
from shoal.dht.record import sign_record
from shoal.dht.transport import FindValueAnswer
from shoal.dht.virtual_loop import run_virtual
from shoal.errors import PeerTimeout
from shoal.net.identity import Identity

OWN = Identity.from_seed(b"me").peer_id.raw


def _contacts(n: int) -> list[Contact]:
    return [Contact(Identity.from_seed(b"n%d" % i).peer_id, f"a:{i}") for i in range(n)]


class ScriptedTransport:
    """Contacts in ``dead`` never answer (the call times out); the rest answer at once."""

    def __init__(self, dead: set[bytes], answer: FindValueAnswer) -> None:
        self.dead = dead
        self.answer = answer
        self.asked: list[bytes] = []

    async def find_value(
        self, peer: Contact, location: int, *, timeout_s: float
    ) -> FindValueAnswer:
        self.asked.append(peer.peer_id.raw)
        if peer.peer_id.raw in self.dead:
            await asyncio.sleep(timeout_s)
            raise PeerTimeout("no answer", peer=peer.address)
        await asyncio.sleep(0.01)
        return self.answer

    find_node = find_value  # same shape is enough for these tests


def test_value_behind_many_dead_contacts_is_found_despite_the_in_flight_cap():
    contacts = _contacts(8)
    target = contacts[0].node_id
    by_distance = sorted(contacts, key=lambda c: c.node_id ^ target)
    live = by_distance[-1]
    record = sign_record(Identity.from_seed(b"w"), b"k", b"v", 1e12)
    transport = ScriptedTransport(
        {c.peer_id.raw for c in by_distance[:-1]}, FindValueAnswer([record], [])
    )

    async def scenario():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        result = await iterative_lookup(
            transport,
            contacts,
            target,
            own_raw=OWN,
            k=8,
            alpha=1,
            rpc_timeout_s=1.0,
            lookup_timeout_s=10.0,
            slow_rpc_s=0.1,
            find_value=True,
            value_quorum=1,
        )
        return result, loop.time() - t0

    result, elapsed = run_virtual(scenario())
    assert result.records == [record] and live.peer_id.raw in transport.asked
    assert elapsed < 10.0


def test_lookup_where_nobody_answers_ends_at_its_deadline_and_reports_failures():
    contacts = _contacts(30)
    transport = ScriptedTransport({c.peer_id.raw for c in contacts}, FindValueAnswer([], []))
    failed: list[Contact] = []

    async def scenario():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        result = await iterative_lookup(
            transport,
            contacts,
            12345,
            own_raw=OWN,
            k=20,
            alpha=3,
            rpc_timeout_s=1.0,
            lookup_timeout_s=2.5,
            slow_rpc_s=1.0,
            on_failure=failed.append,
        )
        return result, loop.time() - t0

    result, elapsed = run_virtual(scenario())
    assert elapsed <= 2.5 + 1e-9 and result.timed_out
    assert result.closest == [] and len(failed) >= 3
