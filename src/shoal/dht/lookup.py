"""Iterative Kademlia lookups (FIND_NODE and FIND_VALUE) with parallelism and deadlines.

A lookup keeps a shortlist of the contacts closest to the target, queries up to ``alpha``
of the closest not-yet-queried ones at a time, merges the contacts they return, and ends when

* the ``k`` closest live contacts have all answered (converged), or
* (FIND_VALUE) ``value_quorum`` nodes returned records, or
* the lookup deadline passed (it then returns what it has; it never overruns).

Each RPC has its own deadline (``rpc_timeout_s``); a contact that fails is reported through
``on_failure`` and skipped. An RPC unanswered after ``slow_rpc_s`` gives its lane to the next
candidate and no longer counts among the k closest, but stays in flight (at most
``3 * alpha`` in flight in all) and is used if it answers before the lookup ends; so a dead
node delays a lookup by ``slow_rpc_s`` rather than by a whole RPC timeout. Every RPC task is
owned by the lookup and cancelled when it returns.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from shoal.dht.ids import Contact
from shoal.dht.record import Record
from shoal.dht.transport import MAX_CONTACTS_PER_ANSWER, DHTTransport, FindValueAnswer
from shoal.errors import NetworkError

__all__ = ["LookupResult", "iterative_lookup"]


@dataclass(slots=True)
class LookupResult:
    """What a lookup found. ``closest`` holds contacts that answered, nearest first."""

    closest: list[Contact]
    records: list[Record] = field(default_factory=list)
    value_hops: int | None = None
    """Hop count of the first answer that carried records (1 = a contact we already knew)."""
    rpcs: int = 0
    timed_out: bool = False


@dataclass(slots=True)
class _Candidate:
    contact: Contact
    hop: int
    state: int = 0  # 0 new, 1 in flight, 2 answered, 3 failed, 4 in flight but slow


async def iterative_lookup(
    transport: DHTTransport,
    seeds: list[Contact],
    target: int,
    *,
    own_raw: bytes,
    k: int,
    alpha: int,
    rpc_timeout_s: float,
    lookup_timeout_s: float,
    slow_rpc_s: float | None = None,
    find_value: bool = False,
    value_quorum: int = 1,
    on_success: Callable[[Contact], None] = lambda c: None,
    on_failure: Callable[[Contact], None] = lambda c: None,
) -> LookupResult:
    """Run one lookup; never raises for peer failures, never runs past ``lookup_timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + lookup_timeout_s
    shortlist: dict[bytes, _Candidate] = {}
    ordered: list[tuple[int, bytes]] = []  # (distance, PeerID raw), nearest first

    def add(contact: Contact, hop: int) -> None:
        raw = contact.peer_id.raw
        if raw != own_raw and raw not in shortlist:
            shortlist[raw] = _Candidate(contact, hop)
            bisect.insort(ordered, (contact.node_id ^ target, raw))

    for contact in seeds:
        add(contact, 1)
    result = LookupResult(closest=[])
    value_answers = 0
    inflight: dict[asyncio.Task[object], _Candidate] = {}
    started: dict[asyncio.Task[object], float] = {}
    slow_s = rpc_timeout_s if slow_rpc_s is None else slow_rpc_s
    max_inflight = 3 * alpha  # slow RPCs stay in flight, but never more than this

    def frontier() -> list[_Candidate]:
        alive: list[_Candidate] = []
        for _, raw in ordered:
            cand = shortlist[raw]
            if cand.state < 3:
                alive.append(cand)
                if len(alive) == k:
                    break
        return alive

    async def query(cand: _Candidate) -> object:
        if find_value:
            return await transport.find_value(cand.contact, target, timeout_s=rpc_timeout_s)
        return await transport.find_node(cand.contact, target, timeout_s=rpc_timeout_s)

    try:
        while True:
            if find_value and value_answers >= value_quorum:
                break
            now = loop.time()
            lanes = 0
            for t, c in inflight.items():
                if now - started[t] < slow_s:
                    lanes += 1
                elif c.state == 1:
                    c.state = 4  # no longer holds a lane nor a place among the k closest
            waiting = False  # a candidate is left that the in-flight cap holds back
            for cand in frontier():
                if lanes >= alpha:
                    break
                if cand.state == 0 and len(inflight) >= max_inflight:
                    waiting = True
                    break
                if cand.state == 0:
                    cand.state = 1
                    result.rpcs += 1
                    lanes += 1
                    task = asyncio.ensure_future(query(cand))
                    inflight[task] = cand
                    started[task] = now
            if lanes == 0 and not waiting:
                break  # every one of the k closest answered, failed or is too slow
            remaining = deadline - now
            if remaining <= 0:
                result.timed_out = True
                break
            # Wake at the first answer, or when the next RPC turns slow and frees its lane.
            turns_slow = [started[t] + slow_s - now for t in inflight if now - started[t] < slow_s]
            wait_s = min([remaining, *(w for w in turns_slow if w > 0)])
            done, _ = await asyncio.wait(
                inflight, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                cand = inflight.pop(task)
                del started[task]
                exc = task.exception()
                if exc is not None:
                    if not isinstance(exc, NetworkError):
                        raise exc
                    cand.state = 3
                    on_failure(cand.contact)
                    continue
                cand.state = 2
                on_success(cand.contact)
                answer = task.result()
                if isinstance(answer, FindValueAnswer):
                    closer = answer.closer
                    if answer.records:
                        value_answers += 1
                        result.records.extend(answer.records)
                        if result.value_hops is None:
                            result.value_hops = cand.hop
                else:
                    closer = answer  # type: ignore[assignment]
                for contact in closer[:MAX_CONTACTS_PER_ANSWER]:
                    add(contact, cand.hop + 1)
    finally:
        for task in inflight:
            task.cancel()
        if inflight:
            await asyncio.gather(*inflight, return_exceptions=True)
    answered = (shortlist[raw] for _, raw in ordered)
    result.closest = [c.contact for c in answered if c.state == 2][:k]
    return result
