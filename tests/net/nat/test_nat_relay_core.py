"""``RelayCore`` without gRPC: circuits, counters, limits, accept and idle timeouts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from shoal.errors import PeerUnavailable, ProtocolViolation
from shoal.net.identity import Identity, PeerID
from shoal.net.nat.limits import MAX_FRAME_BYTES, RelayConfig
from shoal.net.nat.relay import RelayCore
from shoal.net.proto.v1 import relay_pb2

Frame = relay_pb2.RelayFrame


def run(coro, timeout_s: float = 15.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def pid() -> PeerID:
    return Identity.generate().peer_id


async def feed(queue: asyncio.Queue[Frame | None]) -> AsyncIterator[Frame]:
    while (frame := await queue.get()) is not None:
        yield frame


class Ends:
    """A reserved target and a dialer with one open circuit between them."""

    def __init__(self, core: RelayCore) -> None:
        self.core = core
        self.target, self.dialer = pid(), pid()
        self.to_relay_d: asyncio.Queue[Frame | None] = asyncio.Queue()
        self.to_relay_t: asyncio.Queue[Frame | None] = asyncio.Queue()

    async def open(self) -> Ends:
        self.events = self.core.listen(self.target, "198.18.0.9:5000")
        first = await anext(self.events)
        assert first.circuit_id == 0 and first.observed == "198.18.0.9:5000"
        self.d = self.core.connect(self.dialer, feed(self.to_relay_d))
        await self.to_relay_d.put(Frame(target=self.target.raw))
        opened = asyncio.ensure_future(anext(self.d))
        event = await anext(self.events)
        assert event.dialer == self.dialer.raw
        self.t = self.core.accept(self.target, feed(self.to_relay_t))
        await self.to_relay_t.put(Frame(circuit_id=event.circuit_id))
        assert (await anext(self.t)).open and (await opened).open
        return self


def test_bytes_cross_both_ways_and_are_counted() -> None:
    async def main() -> None:
        core = RelayCore(RelayConfig())
        ends = await Ends(core).open()
        await ends.to_relay_d.put(Frame(data=b"x" * 1000))
        assert (await anext(ends.t)).data == b"x" * 1000
        await ends.to_relay_t.put(Frame(data=b"yy"))
        assert (await anext(ends.d)).data == b"yy"
        [circuit] = core.stats()["circuits"]
        assert (circuit["bytes_to_target"], circuit["bytes_to_dialer"]) == (1000, 2)
        assert circuit["open"] and core.total_bytes == 1002
        await ends.to_relay_d.put(None)  # the dialer ends its stream: the target's ends too
        with pytest.raises(StopAsyncIteration):
            await anext(ends.t)
        await ends.d.aclose()
        assert [c["open"] for c in core.stats()["circuits"]] == [False]

    run(main())


def test_reservations_and_circuits_are_bounded() -> None:
    async def main() -> None:
        core = RelayCore(RelayConfig(max_reservations=1, max_circuits_per_peer=1))
        ends = await Ends(core).open()
        with pytest.raises(PeerUnavailable, match="reservations"):
            await anext(core.listen(pid(), ""))
        again: asyncio.Queue[Frame | None] = asyncio.Queue()
        await again.put(Frame(target=ends.target.raw))
        with pytest.raises(PeerUnavailable, match="open circuits"):
            await anext(core.connect(pid(), feed(again)))
        nobody: asyncio.Queue[Frame | None] = asyncio.Queue()
        await nobody.put(Frame(target=pid().raw))
        with pytest.raises(PeerUnavailable, match="no reservation"):
            await anext(core.connect(pid(), feed(nobody)))
        bad: asyncio.Queue[Frame | None] = asyncio.Queue()
        await bad.put(Frame(target=b"short"))
        with pytest.raises(ProtocolViolation):
            await anext(core.connect(pid(), feed(bad)))
        assert core.refused == 3

    run(main())


def test_a_target_that_does_not_accept_is_given_up() -> None:
    async def main() -> None:
        core = RelayCore(RelayConfig(accept_timeout_s=0.2))
        target = pid()
        events = core.listen(target, "")
        await anext(events)
        q: asyncio.Queue[Frame | None] = asyncio.Queue()
        await q.put(Frame(target=target.raw))
        with pytest.raises(PeerUnavailable, match="did not accept"):
            await anext(core.connect(pid(), feed(q)))
        assert core.stats()["circuits"][0]["open"] is False

    run(main())


def test_frames_over_the_limit_are_refused() -> None:
    async def main() -> None:
        core = RelayCore(RelayConfig())
        ends = await Ends(core).open()
        await ends.to_relay_d.put(Frame(data=b"z" * (MAX_FRAME_BYTES + 1)))
        with pytest.raises(StopAsyncIteration):
            await anext(ends.t)  # the circuit ends; nothing was forwarded
        assert core.total_bytes == 0

    run(main())


def test_idle_circuits_close() -> None:
    async def main() -> None:
        now = [0.0]
        core = RelayCore(RelayConfig(idle_timeout_s=0.05), clock=lambda: now[0])
        ends = await Ends(core).open()
        now[0] = 10.0  # nothing crossed for 10 s of the relay's clock
        with pytest.raises(StopAsyncIteration):
            await anext(ends.t)

    run(main())


def test_each_direction_is_held_to_the_rate() -> None:
    async def main() -> None:
        rate = 4e6
        core = RelayCore(RelayConfig(rate_bytes_s=rate, burst_bytes=MAX_FRAME_BYTES))
        ends = await Ends(core).open()
        start = time.monotonic()
        for _ in range(4):
            await ends.to_relay_d.put(Frame(data=b"r" * MAX_FRAME_BYTES))
        for _ in range(4):
            assert len((await anext(ends.t)).data) == MAX_FRAME_BYTES
        # the burst covers one frame; the other three wait for tokens
        assert time.monotonic() - start >= 0.9 * 3 * MAX_FRAME_BYTES / rate

    run(main())
