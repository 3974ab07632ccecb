"""Inbox bounds: pending rounds, pending bytes, closed rounds, waits with deadlines."""

from __future__ import annotations

import asyncio

import torch

from shoal.parallel.data.messages import Contribution, Report
from shoal.parallel.data.transport import Inbox


def _part(rid: bytes, nbytes: int) -> Contribution:
    return Contribution(rid, "a", 0, 1.0, torch.zeros(nbytes // 4))


def test_pending_rounds_and_bytes_are_bounded_and_opening_lifts_the_byte_bound():
    inbox = Inbox(max_pending_rounds=2, max_pending_bytes=1000)
    assert inbox.deliver(_part(b"r1", 400))
    assert inbox.deliver(_part(b"r2", 400))
    assert not inbox.deliver(_part(b"r2", 400))  # over the byte bound
    assert inbox.deliver(_part(b"r3", 100))  # third pending round evicts the oldest
    assert inbox.messages(b"r1") == [] and len(inbox.messages(b"r3")) == 1
    inbox.open(b"r2")
    assert inbox.deliver(_part(b"r2", 4000))  # an open round is bounded by count only
    assert inbox.dropped == 1


def test_late_messages_for_a_closed_round_are_dropped():
    inbox = Inbox()
    inbox.open(b"r")
    inbox.close(b"r")
    assert not inbox.deliver(Report(b"r", "a", 0, frozenset()))
    assert inbox.messages(b"r") == []


def test_wait_until_returns_on_delivery_or_at_the_deadline():
    async def main():
        inbox = Inbox()
        inbox.open(b"r")
        loop = asyncio.get_running_loop()
        waiter = asyncio.ensure_future(
            inbox.wait_until(lambda: len(inbox.messages(b"r")) == 1, loop.time() + 5)
        )
        await asyncio.sleep(0)
        inbox.deliver(Report(b"r", "a", 0, frozenset()))
        assert await waiter is True
        start = loop.time()
        assert await inbox.wait_until(lambda: False, start + 0.05) is False
        assert loop.time() - start >= 0.05

    asyncio.run(main())
