"""The outbox between a reducer's sends and a client's pull streams."""

from __future__ import annotations

import asyncio

import pytest

from shoal.errors import PeerTimeout, RemoteError
from shoal.net.identity import PeerID
from shoal.parallel.data.outbox import Outbox

A, B = PeerID(b"a" * 32), PeerID(b"b" * 32)


def test_a_send_returns_once_the_item_is_pulled_and_the_slot_goes_away():
    async def main():
        box: Outbox[str] = Outbox()
        send = asyncio.ensure_future(box.send(A, b"r", "report", 5.0))
        async with box.pull(A, b"r", 5.0) as stream:
            got = await stream.next()
            assert got is not None and got[0] == "report"
            assert not send.done()  # not released before the item is written
            got[1].set_result(None)
            await send
        assert len(box) == 0

    asyncio.run(main())


def test_pulls_see_only_their_own_member_and_round():
    async def main():
        box: Outbox[str] = Outbox()
        sends = [
            asyncio.ensure_future(box.send(A, b"r1", "a-r1", 5.0)),
            asyncio.ensure_future(box.send(B, b"r1", "b-r1", 5.0)),
            asyncio.ensure_future(box.send(A, b"r2", "a-r2", 5.0)),
        ]
        async with box.pull(A, b"r1", 0.05) as stream:
            seen = []
            while (got := await stream.next()) is not None:
                seen.append(got[0])
                got[1].set_result(None)
        assert seen == ["a-r1"]
        await sends[0]
        assert not sends[1].done() and not sends[2].done()
        for s in sends[1:]:
            s.cancel()

    asyncio.run(main())


def test_an_unpulled_send_times_out_and_is_withdrawn():
    async def main():
        box: Outbox[str] = Outbox()
        with pytest.raises(PeerTimeout, match="did not pull"):
            await box.send(A, b"r", "result", 0.01)
        assert len(box) == 0  # the item did not stay queued
        async with box.pull(A, b"r", 0.01) as stream:
            assert await stream.next() is None

    asyncio.run(main())


def test_an_item_whose_write_failed_goes_to_the_next_pull():
    async def main():
        box: Outbox[str] = Outbox()
        send = asyncio.ensure_future(box.send(A, b"r", "result", 5.0))
        async with box.pull(A, b"r", 5.0) as first:
            item, taken = await first.next()
            first.put_back(item, taken)  # the stream broke mid-write
        async with box.pull(A, b"r", 5.0) as second:
            item, taken = await second.next()
            assert item == "result"
            taken.set_result(None)
        await send

    asyncio.run(main())


def test_slots_and_pull_streams_are_bounded():
    async def main():
        box: Outbox[str] = Outbox(max_slots=2, max_pulls_per_member=1)
        async with box.pull(A, b"r1", 1.0):
            with pytest.raises(RemoteError, match="pull streams per member"):
                async with box.pull(A, b"r2", 1.0):
                    pass
            async with box.pull(B, b"r1", 1.0):
                with pytest.raises(RemoteError, match="outbox full"):
                    await box.send(B, b"r3", "x", 1.0)
        assert len(box) == 0

    asyncio.run(main())
