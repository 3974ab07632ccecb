"""`within` (a timeout that never swallows a cancellation) and the `host:port` parser."""

from __future__ import annotations

import asyncio

import pytest

from shoal.net.aio import IdleTimeout, within


def test_a_cancellation_arriving_with_the_result_is_not_lost() -> None:
    # asyncio.wait_for on Python 3.11 returns the result here and the task runs on.
    async def main() -> None:
        inner = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(within(inner, 10.0))
        await asyncio.sleep(0)  # the task now waits on inner
        inner.set_result("done")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_a_timeout_raises_and_cancels_what_it_waited_for() -> None:
    async def main() -> None:
        inner = asyncio.ensure_future(asyncio.sleep(60))
        with pytest.raises(TimeoutError):
            await within(inner, 0.01)
        await asyncio.sleep(0)
        assert inner.cancelled()
        assert await within(asyncio.sleep(0, "value"), None) == "value"

    asyncio.run(main())


def test_an_idle_timeout_moves_with_progress_and_fires_without_it() -> None:
    from shoal.dht.virtual_loop import run_virtual

    async def steady() -> float:  # a frame every 0.9 s for 10 s, a limit of 1 s
        loop = asyncio.get_running_loop()
        async with IdleTimeout(1.0) as idle:
            for _ in range(11):
                await asyncio.sleep(0.9)
                idle.progress()
        return loop.time()

    assert run_virtual(steady()) == pytest.approx(9.9)

    async def stalls() -> float:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError, match="no progress for 1 s"):
            async with IdleTimeout(1.0) as idle:
                await asyncio.sleep(0.9)
                idle.progress()
                await asyncio.sleep(3600.0)
        return loop.time()

    assert run_virtual(stalls()) == pytest.approx(1.9)

    async def expired() -> float:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            async with IdleTimeout(3600.0) as idle:
                loop.call_later(0.5, idle.expire)
                await asyncio.sleep(3600.0)
        return loop.time()

    assert run_virtual(expired()) == pytest.approx(0.5)


def test_an_idle_timeout_expired_after_its_body_cancels_nothing() -> None:
    async def main() -> str:
        async with IdleTimeout(3600.0) as idle:
            pass
        idle.expire()  # e.g. the round closed just after the message was whole
        await asyncio.sleep(0)
        return "not cancelled"

    assert asyncio.run(main()) == "not cancelled"


def test_a_cancellation_from_outside_an_idle_timeout_stays_a_cancellation() -> None:
    async def body(started: asyncio.Event) -> None:
        async with IdleTimeout(3600.0):
            started.set()
            await asyncio.sleep(3600.0)

    async def main() -> None:
        started = asyncio.Event()
        task = asyncio.ensure_future(body(started))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_host_port_refuses_other_grpc_targets() -> None:
    from shoal.net.config import split_host_port

    assert split_host_port("peer.example:9") == ("peer.example", 9)
    assert split_host_port("[::1]:5") == ("::1", 5)
    for bad in ("unix:/tmp/peer.sock", "dns:///x:1", "::1:5", "[]:5", "a b:3", "x@y:3"):
        assert split_host_port(bad) is None, bad
