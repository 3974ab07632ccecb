"""Inbox bounds: pending rounds, pending bytes, closed rounds, waits with deadlines."""

from __future__ import annotations

import asyncio

import pytest
import torch

from shoal.errors import ProtocolViolation
from shoal.parallel.data.messages import Contribution, Leave, Report
from shoal.parallel.data.transport import Inbox


def _part(rid: bytes, nbytes: int, sender: str = "a", part: int = 0) -> Contribution:
    return Contribution(rid, sender, part, 1.0, torch.zeros(nbytes // 4))


def test_pending_rounds_and_bytes_are_bounded_and_opening_lifts_the_byte_bound():
    inbox = Inbox(max_pending_rounds=2, max_pending_bytes=1000)
    assert inbox.deliver(_part(b"r1", 400))
    assert inbox.deliver(_part(b"r2", 400))
    assert not inbox.deliver(_part(b"r2", 400, "b"))  # over the byte bound
    assert inbox.deliver(_part(b"r3", 100))  # third pending round evicts the oldest
    assert inbox.messages(b"r1") == [] and len(inbox.messages(b"r3")) == 1
    inbox.open(b"r2")
    assert inbox.deliver(_part(b"r2", 4000, "c"))  # an open round is bounded by count only
    assert inbox.dropped == 1


def test_bytes_being_received_count_against_the_pending_bound():
    inbox = Inbox(max_pending_bytes=1000)
    assert inbox.deliver(_part(b"r1", 400))
    inbox.reserve(300, "a")
    inbox.reserve(200, "b")
    with pytest.raises(ProtocolViolation, match="no room"):
        inbox.reserve(200, "c")
    assert not inbox.deliver(_part(b"r2", 200))
    inbox.release(300, "a")
    inbox.release(200, "b")
    assert inbox.deliver(_part(b"r2", 200))


def test_one_sender_holds_at_most_half_of_the_pending_bound():
    # One peer announcing four 256 MiB parts and stalling held the whole 1 GiB, and every
    # honest early contribution was refused.
    inbox = Inbox(max_pending_bytes=1000)
    inbox.reserve(400, "a")
    with pytest.raises(ProtocolViolation, match="from one sender"):
        inbox.reserve(101, "a")
    inbox.reserve(500, "b")  # others still have room
    inbox.release(400, "a")
    inbox.reserve(100, "a")


def test_an_open_round_keeps_one_message_per_kind_sender_and_part():
    inbox = Inbox()
    inbox.open(b"r")
    first = _part(b"r", 40)
    assert inbox.deliver(first)
    assert inbox.check(b"r", Contribution, "a", 0, 10) is not None
    assert not inbox.deliver(_part(b"r", 40))  # same sender and part: dropped
    assert inbox.deliver(_part(b"r", 40, part=1))
    assert inbox.deliver(Report(b"r", "a", 0, frozenset()))
    assert inbox.messages(b"r")[0] is first and len(inbox.messages(b"r")) == 3


def test_opening_with_members_and_part_sizes_drops_what_does_not_fit():
    inbox = Inbox()
    assert inbox.deliver(_part(b"r", 40, "stranger"))  # not open yet: held
    assert inbox.deliver(_part(b"r", 40, "a"))
    assert inbox.deliver(_part(b"r", 8, "b"))  # 2 values where part 0 has 10
    inbox.open(b"r", members={"a", "b"}, part_sizes=[10, 5])
    assert [m.sender for m in inbox.messages(b"r")] == ["a"]
    assert not inbox.deliver(_part(b"r", 40, "stranger", part=1))
    assert not inbox.deliver(_part(b"r", 40, "b", part=2))  # no part 2
    assert inbox.check(b"r", Contribution, "b", 1, 6) == "part 1 with 6 values, not 5"
    assert inbox.deliver(_part(b"r", 20, "b", part=1))
    inbox.open(b"r")  # re-opening without a shape keeps the known one
    assert inbox.check(b"r", Contribution, "stranger", 0, 10) is not None


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


def test_concurrent_waits_on_different_rounds_do_not_lose_a_wake_up():
    """One round's wait cannot consume the wake-up of a message for another round."""

    async def main():
        inbox = Inbox()
        for rid in (b"A", b"B", b"X"):
            inbox.open(rid)
        loop = asyncio.get_running_loop()
        got_a = asyncio.ensure_future(
            inbox.wait_until(lambda: len(inbox.messages(b"A")) == 1, loop.time() + 5)
        )
        await asyncio.sleep(0)
        inbox.deliver(Report(b"X", "p", 0, frozenset()))  # wakes A's wait, not for A
        for _ in range(3):  # A's wait re-arms in this gap
            await asyncio.sleep(0)
        inbox.deliver(Report(b"A", "p", 0, frozenset()))
        # a wait for another round starts and ends in the same moment
        assert not await inbox.wait_until(lambda: False, loop.time() + 0.001)
        assert await asyncio.wait_for(got_a, 1.0) is True

    asyncio.run(main())


def test_open_rounds_are_bounded_by_closing_the_oldest():
    inbox = Inbox(max_open_rounds=2)
    for rid in (b"1", b"2", b"3"):
        inbox.open(rid)
    assert not inbox.is_open(b"1") and inbox.is_open(b"2") and inbox.is_open(b"3")
    assert not inbox.deliver(Report(b"1", "a", 0, frozenset()))


def test_a_message_being_received_refuses_its_parallel_repeats():
    """Parallel streams of one (kind, sender, part) would each pass the repeat check while
    none is delivered yet, and each take a part-sized buffer."""
    inbox = Inbox()
    inbox.open(b"r", members={"a"}, part_sizes=[10])
    inbox.receiving(b"r", Contribution, "a", 0)
    assert "being received" in inbox.check(b"r", Contribution, "a", 0, 10)
    assert inbox.check(b"r", Report, "a", 0, None) is None  # another kind is fine
    inbox.received(b"r", Contribution, "a", 0)
    assert inbox.check(b"r", Contribution, "a", 0, 10) is None


def test_leaves_for_a_confirmed_group_count_for_the_part_of_it_that_went_on():
    inbox = Inbox()
    confirmed, went_on = b"G" * 16, b"S" * 16
    early = Leave(confirmed, "c", 3)  # index 3 of the 4 it confirmed
    assert inbox.deliver(early)
    inbox.open(went_on, members=["a", "b", "c"], part_sizes=[4, 4, 4])
    inbox.alias_leaves(confirmed, went_on)  # the one held already moves over
    assert inbox.messages(went_on) == [Leave(went_on, "c", 0)]
    assert inbox.messages(confirmed) == []  # moved, not copied
    assert inbox.deliver(Leave(confirmed, "b", 1))  # and later ones go there at once
    assert [m.sender for m in inbox.messages(went_on)] == ["c", "b"]
    assert not inbox.deliver(Leave(confirmed, "x", 0))  # not a member of that round
    inbox.deliver(Contribution(confirmed, "a", 0, 1.0, torch.zeros(4)))
    assert len(inbox.messages(went_on)) == 2  # only leaves are carried over
