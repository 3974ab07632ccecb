"""The outbox between a reducer's sends and a client's pull streams."""

from __future__ import annotations

import asyncio

import pytest

from shoal.errors import RemoteError
from shoal.net.identity import PeerID
from shoal.parallel.data.outbox import Outbox

A, B = PeerID(b"a" * 32), PeerID(b"b" * 32)


def test_a_pull_takes_what_was_posted_and_the_slot_goes_away():
    async def main():
        box: Outbox[str] = Outbox()
        box.post(A, b"r", "report", 5.0)
        box.post(A, b"r", "result", 5.0)
        async with box.pull(A, b"r", 0.05) as stream:
            assert await stream.next() == "report"
            assert await stream.next() == "result"
            assert await stream.next() is None  # nothing more before its deadline
        assert len(box) == 0 and box.queued() == 0

    asyncio.run(main())


def test_a_pull_waits_for_a_later_post():
    async def main():
        box: Outbox[str] = Outbox()
        async with box.pull(A, b"r", 5.0) as stream:
            waiting = asyncio.ensure_future(stream.next())
            await asyncio.sleep(0)  # let the pull start waiting: the post must wake it
            assert not waiting.done()
            box.post(A, b"r", "result", 5.0)
            assert await asyncio.wait_for(waiting, 5.0) == "result"

    asyncio.run(main())


def test_pulls_see_only_their_own_member_and_round():
    async def main():
        box: Outbox[str] = Outbox()
        box.post(A, b"r1", "a-r1", 5.0)
        box.post(B, b"r1", "b-r1", 5.0)
        box.post(A, b"r2", "a-r2", 5.0)
        async with box.pull(A, b"r1", 0.05) as stream:
            seen = [item async for item in _drain(stream)]
        assert seen == ["a-r1"]
        assert box.queued() == 2

    asyncio.run(main())


async def _drain(stream):
    while (item := await stream.next()) is not None:
        yield item


def test_an_expired_item_is_dropped_and_its_slot_released():
    async def main():
        box: Outbox[str] = Outbox()
        box.post(A, b"r", "result", 0.0)  # nobody pulled it before the round's deadline
        async with box.pull(A, b"r", 0.01) as stream:
            assert await stream.next() is None
        assert len(box) == 0 and box.queued() == 0

    asyncio.run(main())


def test_an_item_expires_even_behind_one_that_lives_longer():
    async def main():
        box: Outbox[str] = Outbox()
        loop = asyncio.get_running_loop()
        box.post(A, b"r", "long", 60.0)
        box.post(A, b"r", "short", 0.0)
        limit = loop.time() + 5.0
        while box.queued() > 1 and loop.time() < limit:  # until the expiry callback ran
            await asyncio.sleep(0)
        assert box.queued() == 1 and len(box) == 1
        async with box.pull(A, b"r", 0.01) as stream:
            assert await stream.next() == "long"

    asyncio.run(main())


def test_an_item_whose_write_failed_goes_to_the_next_pull():
    async def main():
        box: Outbox[str] = Outbox()
        box.post(A, b"r", "result", 5.0)
        async with box.pull(A, b"r", 5.0) as first:
            assert await first.next() == "result"
            first.put_back()  # the stream broke mid-write
        async with box.pull(A, b"r", 0.05) as second:
            assert await second.next() == "result"
            assert await second.next() is None

    asyncio.run(main())


def test_an_item_put_back_after_its_deadline_is_dropped_and_its_slot_released():
    # Its one expiry timer had fired while the item was out being written: requeued, it
    # waited for none, held its slot forever, and at max_slots every post failed.
    async def main():
        box: Outbox[str] = Outbox(max_slots=1)
        box.post(A, b"r", "result", 0.05)
        async with box.pull(A, b"r", 5.0) as stream:
            assert await stream.next() == "result"
            await asyncio.sleep(0.1)  # a slow write, past the round's deadline
            stream.put_back()  # then the stream broke
        assert len(box) == 0 and box.queued() == 0
        box.post(B, b"r2", "next", 1.0)  # room for another round

    asyncio.run(main())


def test_an_expiry_timer_firing_a_little_early_still_drops_its_item():
    # uvloop rounds timer delays to whole milliseconds: a timer may fire before the time
    # its item expires, and then nothing ever dropped the item.
    async def main():
        box: Outbox[str] = Outbox()
        box.post(A, b"r", "result", 60.0)
        expires = box._slots[(A, b"r")].queue[0].expires
        box._expire((A, b"r"), expires)  # the item's timer, 60 s early by the loop's clock
        assert len(box) == 0 and box.queued() == 0

    asyncio.run(main())


def test_a_newer_pull_of_the_member_takes_over_from_the_older_one():
    # A NAT rebinding breaks a client's stream on its side only; here its old stream stays
    # open until keepalive notices (30 s) and took the next message into a dead connection.
    async def main():
        box: Outbox[str] = Outbox()
        async with box.pull(A, b"r", 60.0) as old:
            waiting = asyncio.ensure_future(old.next())
            await asyncio.sleep(0)
            async with box.pull(A, b"r", 60.0) as new:
                assert await asyncio.wait_for(waiting, 1.0) is None  # the old stream ends
                box.post(A, b"r", "report", 5.0)
                assert await new.next() == "report"
                assert await old.next() is None

    asyncio.run(main())


def test_a_counting_client_gets_again_what_a_stream_wrote_into_a_dead_connection():
    # The old stream's end here does not know its connection is dead: what it takes goes
    # nowhere, yet its write succeeds (no put_back). The client's count says what arrived.
    async def main():
        box: Outbox[str] = Outbox()
        box.post(A, b"r", "report", 5.0)
        box.post(A, b"r", "result 0", 5.0)
        async with box.pull(A, b"r", 60.0, received=0) as old:
            assert await old.next() == "report"  # arrived
            assert await old.next() == "result 0"  # into the dead connection
            box.post(A, b"r", "result 1", 5.0)
            assert box.unacknowledged() == 2
            async with box.pull(A, b"r", 0.05, received=1) as new:
                assert await old.next() is None  # the newer stream took over
                assert [item async for item in _drain(new)] == ["result 0", "result 1"]
                old.put_back()  # its write fails at last: already dealt with, not queued
                assert box.queued() == 0
        async with box.pull(A, b"r", 0.05, received=3) as last:
            assert await last.next() is None
        assert box.unacknowledged() == 0 and len(box) == 0

    asyncio.run(main())


def test_a_count_goes_on_across_a_slot_that_went_away():
    # The slot of a member round goes once nothing is held or pulled; a post after that
    # was numbered from 0 again, and the client's count dropped it.
    async def main():
        box: Outbox[str] = Outbox()
        box.post(A, b"r", "report", 30.0)
        async with box.pull(A, b"r", 0.05, received=0) as first:
            assert await first.next() == "report"
        async with box.pull(A, b"r", 0.05, received=1) as second:  # nothing new yet
            assert await second.next() is None
        assert len(box) == 0  # gone
        box.post(A, b"r", "result", 30.0)
        async with box.pull(A, b"r", 0.05, received=1) as third:
            assert await third.next() == "result"

    asyncio.run(main())


def test_a_client_that_does_not_count_gets_again_only_what_failed_to_write():
    async def main():
        box: Outbox[str] = Outbox()
        box.post(A, b"r", "report", 5.0)
        box.post(A, b"r", "result", 5.0)
        async with box.pull(A, b"r", 60.0) as old:
            assert await old.next() == "report"
            assert await old.next() == "result"
            old.put_back()
            assert box.unacknowledged() == 0  # nothing is kept for it
            async with box.pull(A, b"r", 0.05) as new:
                assert [item async for item in _drain(new)] == ["result"]

    asyncio.run(main())


def test_what_was_written_expires_and_gives_way_to_new_posts():
    async def main():
        box: Outbox[str] = Outbox(max_slots=2)
        box.post(A, b"r1", "x", 60.0)
        box.post(B, b"r1", "y", 60.0)
        for member in (A, B):
            async with box.pull(member, b"r1", 5.0, received=0) as stream:
                assert await stream.next() in ("x", "y")
        assert len(box) == 2 and box.unacknowledged() == 2 and box.queued() == 0
        # The expiry timer drops written items as it does queued ones.
        box._expire((B, b"r1"), box._slots[(B, b"r1")].written[0].expires)
        assert len(box) == 1
        # Out of slots: what was only kept for a second chance makes room for a post ...
        box.post(B, b"r2", "next", 60.0)
        box.post(A, b"r2", "next", 60.0)
        assert box.unacknowledged() == 0 and box.queued() == 2
        # ... but queued items are never dropped for one.
        with pytest.raises(RemoteError, match="outbox full"):
            box.post(B, b"r3", "x", 60.0)

    asyncio.run(main())


def test_slots_and_pull_streams_are_bounded():
    async def main():
        box: Outbox[str] = Outbox(max_slots=2, max_waiting_slots=2, max_pulls_per_member=1)
        async with box.pull(A, b"r1", 1.0):
            with pytest.raises(RemoteError, match="pull streams per member"):
                async with box.pull(A, b"r2", 1.0):
                    pass
            async with box.pull(B, b"r1", 1.0):
                with pytest.raises(RemoteError, match="pulls of empty rounds"):
                    async with box.pull(PeerID(b"c" * 32), b"r1", 1.0):
                        pass
                # Pulls waiting on empty rounds crowd out no post: two more slots fit.
                box.post(B, b"r3", "x", 1.0)
                box.post(B, b"r4", "x", 1.0)
                with pytest.raises(RemoteError, match="outbox full"):
                    box.post(B, b"r5", "x", 1.0)
        assert len(box) == 2  # r3 and r4 hold their items until they expire

    asyncio.run(main())
