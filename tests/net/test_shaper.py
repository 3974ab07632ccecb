"""LinkShaper: token bucket accuracy, throughput cap, added latency, close propagation."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import pytest

from shoal.errors import ConfigError
from shoal.net.shaper import LinkShaper, ShaperConfig, TokenBucket

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run(coro: Awaitable[None], timeout_s: float = 30.0) -> None:
    async def bounded() -> None:
        asyncio.current_task().set_name("test-runner")  # type: ignore[union-attr]
        await asyncio.wait_for(coro, timeout_s)

    asyncio.run(bounded())


async def serve(handler: Handler) -> tuple[asyncio.Server, int, set[asyncio.Task[None]]]:
    """A loopback server whose handler tasks the test owns."""
    tasks: set[asyncio.Task[None]] = set()

    def on_accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(handler(r, w))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], tasks


async def stop(server: asyncio.Server, tasks: set[asyncio.Task[None]]) -> None:
    server.close()
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await server.wait_closed()


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    finally:
        w.close()


def assert_no_tasks_left() -> None:
    others = asyncio.all_tasks() - {asyncio.current_task()}
    assert [t for t in others if t.get_name() != "test-runner"] == []


# ---- pure token bucket -------------------------------------------------------------------


def test_token_bucket_long_run_rate_is_exact() -> None:
    bucket = TokenBucket(rate_bytes_s=1e6, burst_bytes=10_000, now=0.0)
    now, sent = 0.0, 0
    for _ in range(2000):  # a sender that always waits exactly as told
        now += bucket.reserve(4096, now)
        sent += 4096
    # burst is paid for up front, the rest at exactly 1 MB/s
    assert sent - 10_000 == pytest.approx(now * 1e6, rel=1e-9)


def test_token_bucket_burst_is_bounded_after_idle() -> None:
    bucket = TokenBucket(rate_bytes_s=1000.0, burst_bytes=500.0, now=0.0)
    assert bucket.reserve(500, 100.0) == 0.0  # a long idle refills only to the burst
    assert bucket.reserve(100, 100.0) == pytest.approx(0.1)
    assert bucket.reserve(100, 100.0) == pytest.approx(0.2)  # debt accumulates in order


def test_token_bucket_oversleep_is_not_lost_within_burst() -> None:
    bucket = TokenBucket(rate_bytes_s=1000.0, burst_bytes=100.0, now=0.0)
    assert bucket.reserve(200, 0.0) == pytest.approx(0.1)
    # the sender woke 50 ms late: those 50 tokens are still there for the next chunk
    assert bucket.reserve(100, 0.15) == pytest.approx(0.05)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"up_rate_bit_s": 0},
        {"down_rate_bit_s": -1.0},
        {"up_delay_s": -0.1},
        {"burst_s": 0},
        {"chunk_bytes": 10},
        {"listen_port": 70000},
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        ShaperConfig(target_host="127.0.0.1", target_port=1, **kwargs)  # type: ignore[arg-type]


# ---- real sockets on loopback ------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Measurement:
    rate_bit_s: float
    """Steady rate the receiver saw over the window that starts at its first byte."""
    excess_bytes: float
    """Most bytes ever received beyond ``burst + cap * (time since the shaper started)``."""


async def measure_throughput(
    rate_bit_s: float, delay_s: float, duration_s: float, connections: int = 1
) -> Measurement:
    """Rate the receiver sees over all connections, and how far it ever got beyond the cap.

    The cap check is load-independent: whatever the scheduler does, a shaper may never have
    delivered more than its bucket depth plus ``cap * elapsed`` bytes since it started (a late
    reader only sees fewer). The steady rate, in contrast, drops when the machine is busy.
    """
    done = asyncio.Event()
    window = {"start": -1.0, "bytes": 0, "elapsed": 0.0}
    total = {"bytes": 0, "excess": -math.inf}
    cfg = ShaperConfig(
        target_host="127.0.0.1", target_port=1, up_rate_bit_s=rate_bit_s, up_delay_s=delay_s
    )
    rate_bytes_s = rate_bit_s / 8
    burst_bytes = max(16 * 1024, rate_bytes_s * cfg.burst_s)  # bucket depth: "at least 16 KiB"
    loop = asyncio.get_running_loop()
    t0 = loop.time()  # before the shaper (and its bucket) starts: the bound stays conservative

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while (data := await r.read(65536)) and not done.is_set():
            now = loop.time()
            total["bytes"] += len(data)
            allowed = burst_bytes + rate_bytes_s * (now - t0)
            total["excess"] = max(total["excess"], total["bytes"] - allowed)
            if window["start"] < 0:
                window["start"] = now
            elif now - window["start"] >= duration_s:
                window["elapsed"] = now - window["start"]
                done.set()
                break
            else:
                window["bytes"] += len(data)
        w.close()

    async def send(address: tuple[str, int]) -> None:
        _, writer = await asyncio.open_connection(*address)
        block = b"x" * 65536
        for _ in range(100_000):  # bounded; ends when the sink has its window
            if done.is_set():
                break
            writer.write(block)
            try:
                await asyncio.wait_for(writer.drain(), 10)
            except ConnectionError:
                break  # the sink closed after measuring
        writer.close()

    server, port, tasks = await serve(sink)
    async with LinkShaper(dataclasses.replace(cfg, target_port=port)) as shaper:
        await asyncio.gather(*(send(shaper.address) for _ in range(connections)))
        await asyncio.wait_for(done.wait(), 5)
    await stop(server, tasks)
    return Measurement(window["bytes"] * 8 / window["elapsed"], total["excess"])


@pytest.mark.parametrize(
    ("rate_mbit", "delay_ms", "connections"), [(20, 0, 1), (50, 0, 1), (40, 50, 1), (30, 20, 3)]
)
def test_throughput_never_exceeds_the_cap_and_reaches_it(
    rate_mbit: int, delay_ms: int, connections: int
) -> None:
    """The cap is per link: parallel connections share it.

    Never exceeding the cap holds on every attempt (it cannot depend on load). Reaching it
    needs the CPU when the bucket refills: a late wake-up loses the tokens beyond the 10 ms
    bucket. Attempts stop at the first within 10 % of the cap (the usual case); under heavy
    load with busy threads in this process (a full suite run) all three stayed below 0.8,
    so the lower bound on the best is loose: it still catches a pump that sleeps twice as
    long as the bucket asks. The exact long-run rate of the bucket itself is checked with a
    fake clock above.
    """

    cap_bit_s = rate_mbit * 1e6
    rates: list[float] = []

    async def main() -> None:
        for _ in range(3):
            m = await measure_throughput(
                cap_bit_s, delay_ms / 1000, duration_s=1.5, connections=connections
            )
            assert m.excess_bytes <= 0, m
            rates.append(m.rate_bit_s)
            if m.rate_bit_s >= 0.9 * cap_bit_s:
                break
        assert_no_tasks_left()

    run(main(), timeout_s=60.0)
    assert max(rates) >= 0.6 * cap_bit_s, rates


def test_ping_pong_rtt_is_twice_the_delay() -> None:
    async def main() -> None:
        server, port, tasks = await serve(echo)
        cfg = ShaperConfig(
            target_host="127.0.0.1",
            target_port=port,
            up_delay_s=0.030,
            down_delay_s=0.020,
            up_rate_bit_s=50e6,
            down_rate_bit_s=50e6,
        )
        async with LinkShaper(cfg) as shaper:
            reader, writer = await asyncio.open_connection(*shaper.address)
            rtts = []
            for i in range(12):
                t0 = time.perf_counter()
                writer.write(b"ping%02d" % i)
                assert await asyncio.wait_for(reader.readexactly(6), 2) == b"ping%02d" % i
                rtts.append(time.perf_counter() - t0)
            writer.close()
        await stop(server, tasks)
        # the added delay is a floor on every round trip, whatever the load; only the best
        # round trip is held close to it (a busy scheduler adds to some, never to all)
        assert min(rtts) >= 0.050, rtts
        assert min(rtts) < 0.050 + 0.010, rtts
        assert_no_tasks_left()

    run(main())


def test_client_close_reaches_target_and_target_close_reaches_client() -> None:
    async def main() -> None:
        saw_eof = asyncio.Event()

        async def wait_eof_then_close(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            assert await r.read() == b"bye"
            saw_eof.set()
            w.write(b"ok")
            w.close()

        server, port, tasks = await serve(wait_eof_then_close)
        cfg = ShaperConfig(target_host="127.0.0.1", target_port=port, up_delay_s=0.01)
        async with LinkShaper(cfg) as shaper:
            reader, writer = await asyncio.open_connection(*shaper.address)
            writer.write(b"bye")
            writer.write_eof()  # half-close travels through
            await asyncio.wait_for(saw_eof.wait(), 2)
            assert await asyncio.wait_for(reader.read(), 2) == b"ok"  # then EOF
            writer.close()
            for _ in range(100):  # bounded wait for the proxy to drop the connection
                if shaper.active_connections == 0:
                    break
                await asyncio.sleep(0.01)
            assert shaper.active_connections == 0
            assert shaper.up.bytes == 3 and shaper.down.bytes == 2
        await stop(server, tasks)
        assert_no_tasks_left()

    run(main())


def test_close_aborts_open_connections_and_refused_target_closes_client() -> None:
    async def main() -> None:
        server, port, tasks = await serve(echo)
        shaper = LinkShaper(ShaperConfig(target_host="127.0.0.1", target_port=port))
        await shaper.start()
        reader, writer = await asyncio.open_connection(*shaper.address)
        writer.write(b"hi")
        assert await asyncio.wait_for(reader.readexactly(2), 2) == b"hi"
        await shaper.close()
        await shaper.close()  # idempotent
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
        await stop(server, tasks)

        # a target that refuses: the client sees the connection closed, not a hang
        async with LinkShaper(ShaperConfig(target_host="127.0.0.1", target_port=port)) as dead:
            reader, writer = await asyncio.open_connection(*dead.address)
            assert await asyncio.wait_for(reader.read(), 2) == b""
            writer.close()
        assert_no_tasks_left()

    run(main())


def test_command_line_prints_address_and_forwards() -> None:
    async def main() -> None:
        server, port, tasks = await serve(echo)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "shoal.net.shaper",
            "--listen",
            "127.0.0.1:0",
            "--target",
            f"127.0.0.1:{port}",
            "--rate-mbit",
            "50",
            "--delay-ms",
            "5",
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            assert line.startswith("listening 127.0.0.1:")
            reader, writer = await asyncio.open_connection("127.0.0.1", int(line.rsplit(":", 1)[1]))
            writer.write(b"abc")
            assert await asyncio.wait_for(reader.readexactly(3), 5) == b"abc"
            writer.close()
            proc.terminate()
            assert await asyncio.wait_for(proc.wait(), 10) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await stop(server, tasks)

    run(main(), timeout_s=40)


def test_a_stalled_target_pushes_back_on_the_sender() -> None:
    """The delay line is bounded: with a target that never reads, the sender stalls."""

    async def main() -> None:
        reading = asyncio.Event()

        async def never_read(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await reading.wait()  # never set: the target does not read
            w.close()

        server, port, tasks = await serve(never_read)
        cfg = ShaperConfig(
            target_host="127.0.0.1",
            target_port=port,
            up_delay_s=0.2,
            unlimited_buffer_bytes=1 << 20,
        )
        async with LinkShaper(cfg) as shaper:
            _, writer = await asyncio.open_connection(*shaper.address)
            block, written, stalled = b"x" * (1 << 20), 0, False
            for _ in range(64):  # try to push 64 MiB
                writer.write(block)
                try:
                    await asyncio.wait_for(writer.drain(), 1.0)
                except asyncio.TimeoutError:
                    stalled = True
                    break
                written += len(block)
            # kernel socket buffers on both hops hold some MiB; the proxy holds at most ~1 MiB
            assert stalled and written < 40 << 20, written
            writer.transport.abort()
        await stop(server, tasks)
        assert_no_tasks_left()

    run(main())
