"""A link shaper that needs no root: a local TCP proxy with a bandwidth cap and latency.

``LinkShaper`` listens on ``listen_host:listen_port`` and forwards every accepted
connection to ``target_host:target_port``. Each direction ("up" is client -> target,
"down" is target -> client) has its own token bucket (bits/s, shared by all connections,
like one physical link) and its own one-way delay.

Per direction and connection, one task reads a chunk, pays for it at the token bucket
(serialisation), stamps it ``release = now + delay`` (propagation) and queues it on a delay
line; another writes each chunk at its release time, so latency never lowers throughput.
The line holds at most ``rate * delay + slack`` bytes; when full, reading stops and TCP flow
control pushes back on the sender. EOF is forwarded as ``write_eof`` after the delay; an
error on either socket aborts both. The connect to the target itself is not delayed.

Run standalone::

    python -m shoal.net.shaper --listen 127.0.0.1:0 --target 127.0.0.1:PORT \\
        --rate-mbit 50 --delay-ms 50

prints ``listening HOST:PORT`` on stdout and runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from shoal.errors import ConfigError
from shoal.net.aio import within
from shoal.net.config import split_host_port

__all__ = ["DirectionStats", "LinkShaper", "ShaperConfig", "TokenBucket", "main"]

_MIN_BURST_BYTES = 16 * 1024
_RULES: tuple[tuple[tuple[str, ...], Callable[[Any], bool], str], ...] = (
    (("up_rate_bit_s", "down_rate_bit_s"), lambda v: v is None or v > 0, "> 0 or None"),
    (("up_delay_s", "down_delay_s"), lambda v: 0 <= v <= 60, "in [0, 60]"),
    (("burst_s", "connect_timeout_s", "close_timeout_s"), lambda v: v > 0, "> 0"),
    (("chunk_bytes", "slack_bytes", "unlimited_buffer_bytes"), lambda v: v >= 1024, ">= 1024"),
    (("listen_port", "target_port"), lambda v: 0 <= v <= 65535, "in [0, 65535]"),
)


@dataclass(kw_only=True, slots=True)
class ShaperConfig:
    """What the shaped link looks like. Rates of ``None`` mean unlimited."""

    target_host: str
    """Where accepted connections are forwarded."""
    target_port: int
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    """0 picks a free port; read ``LinkShaper.address`` after start."""
    up_rate_bit_s: float | None = None
    """Cap for client -> target bytes, in bits per second, shared by all connections."""
    down_rate_bit_s: float | None = None
    """Cap for target -> client bytes, in bits per second, shared by all connections."""
    up_delay_s: float = 0.0
    """One-way delay added to client -> target bytes."""
    down_delay_s: float = 0.0
    """One-way delay added to target -> client bytes."""
    burst_s: float = 0.010
    """Token bucket depth as time at the cap (at least 16 KiB)."""
    chunk_bytes: int = 64 * 1024
    """Largest single read from a socket."""
    slack_bytes: int = 256 * 1024
    """Delay-line bound beyond ``rate * delay`` before the reader stops."""
    unlimited_buffer_bytes: int = 16 * 1024 * 1024
    """Delay-line bound for a direction without a rate cap."""
    connect_timeout_s: float = 5.0
    """Deadline for connecting to the target."""
    close_timeout_s: float = 2.0
    """Deadline for cancelling connection tasks on close."""

    def __post_init__(self) -> None:
        for names, ok, want in _RULES:
            for name in names:
                if not ok(getattr(self, name)):
                    raise ConfigError(f"{name} must be {want}, got {getattr(self, name)!r}")


class TokenBucket:
    """A token bucket in bytes that lets callers go into debt (pure; the clock is passed in).

    ``reserve(n, now)`` takes ``n`` bytes' worth of tokens and returns how long the caller
    must wait before sending them. One call per chunk, O(1), so it stays cheap at high rates.
    Long-run throughput equals ``rate_bytes_s``; bursts are bounded by ``burst_bytes``
    plus one chunk.
    """

    __slots__ = ("_last", "_tokens", "burst_bytes", "rate_bytes_s")

    def __init__(self, rate_bytes_s: float, burst_bytes: float, now: float) -> None:
        if not rate_bytes_s > 0 or not burst_bytes > 0:
            raise ConfigError(
                f"token bucket needs rate, burst > 0, got {rate_bytes_s}, {burst_bytes}"
            )
        self.rate_bytes_s = rate_bytes_s
        self.burst_bytes = burst_bytes
        self._tokens = burst_bytes
        self._last = now

    def reserve(self, nbytes: int, now: float) -> float:
        """Take ``nbytes`` tokens; return the seconds to wait before sending them (>= 0)."""
        if now > self._last:
            self._tokens = min(
                self.burst_bytes, self._tokens + (now - self._last) * self.rate_bytes_s
            )
            self._last = now
        self._tokens -= nbytes
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self.rate_bytes_s


@dataclass(slots=True)
class DirectionStats:
    """Bytes and chunks delivered in one direction, over all connections."""

    bytes: int = 0
    chunks: int = 0


@dataclass(slots=True)
class _Direction:
    bucket: TokenBucket | None
    delay_s: float
    limit_bytes: int
    stats: DirectionStats = field(default_factory=DirectionStats)


class _DelayLine:
    """FIFO of (release_time, chunk) with a byte bound; ``None`` chunk marks EOF."""

    def __init__(self, limit_bytes: int) -> None:
        self._items: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self._limit = limit_bytes
        self.queued_bytes = 0
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    async def put(self, release: float, chunk: bytes | None) -> None:
        await self._writable.wait()
        self._items.append((release, chunk))
        self.queued_bytes += len(chunk) if chunk else 0
        if self.queued_bytes > self._limit:
            self._writable.clear()
        self._readable.set()

    async def get(self) -> tuple[float, bytes | None]:
        await self._readable.wait()
        release, chunk = self._items.popleft()
        if not self._items:
            self._readable.clear()
        return release, chunk

    def done(self, chunk: bytes | None) -> None:
        """Account for a chunk that has been written (frees room for the reader)."""
        self.queued_bytes -= len(chunk) if chunk else 0
        if self.queued_bytes <= self._limit:
            self._writable.set()


class LinkShaper:
    """Async context manager running the shaping proxy; see the module docstring."""

    def __init__(self, config: ShaperConfig) -> None:
        self.config = config
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._dirs: dict[str, _Direction] = {}
        self.connections_accepted = 0

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``; valid after ``start()``."""
        if self._server is None:
            raise RuntimeError("LinkShaper is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    @property
    def up(self) -> DirectionStats:
        """Client -> target delivery counters."""
        return self._dirs["up"].stats

    @property
    def down(self) -> DirectionStats:
        """Target -> client delivery counters."""
        return self._dirs["down"].stats

    @property
    def active_connections(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        cfg = self.config
        for side, rate, delay in (
            ("up", cfg.up_rate_bit_s, cfg.up_delay_s),
            ("down", cfg.down_rate_bit_s, cfg.down_delay_s),
        ):
            if rate is None:
                bucket, limit = None, cfg.unlimited_buffer_bytes
            else:
                rate_bytes = rate / 8
                bucket = TokenBucket(
                    rate_bytes, max(_MIN_BURST_BYTES, rate_bytes * cfg.burst_s), loop.time()
                )
                limit = int(rate_bytes * delay) + cfg.slack_bytes
            self._dirs[side] = _Direction(bucket=bucket, delay_s=delay, limit_bytes=limit)
        self._server = await asyncio.start_server(self._on_accept, cfg.listen_host, cfg.listen_port)

    async def close(self) -> None:
        """Stop listening and abort every connection; safe to call twice, bounded in time."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.close_timeout_s)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await within(self._server.wait_closed(), self.config.close_timeout_s)

    async def __aenter__(self) -> LinkShaper:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:
            writer.transport.abort()
            return
        self.connections_accepted += 1
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        cfg = self.config
        writers = [c_writer]
        try:
            try:
                t_reader, t_writer = await within(
                    asyncio.open_connection(cfg.target_host, cfg.target_port), cfg.connect_timeout_s
                )
            except (OSError, asyncio.TimeoutError):
                return
            writers.append(t_writer)
            for w in writers:
                _nodelay(w)
            await _all_or_none(
                self._pump(c_reader, t_writer, self._dirs["up"]),
                self._pump(t_reader, c_writer, self._dirs["down"]),
            )
        except OSError:
            pass  # one side broke: both are aborted below
        finally:
            for w in writers:
                w.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: _Direction
    ) -> None:
        line = _DelayLine(direction.limit_bytes)
        await _all_or_none(
            self._read_side(reader, line, direction), self._write_side(writer, line, direction)
        )

    async def _read_side(
        self, reader: asyncio.StreamReader, line: _DelayLine, direction: _Direction
    ) -> None:
        loop = asyncio.get_running_loop()
        chunk_bytes = self.config.chunk_bytes
        while True:
            chunk = await reader.read(chunk_bytes)
            if not chunk:
                await line.put(loop.time() + direction.delay_s, None)
                return
            if direction.bucket is not None:
                wait_s = direction.bucket.reserve(len(chunk), loop.time())
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
            await line.put(loop.time() + direction.delay_s, chunk)

    async def _write_side(
        self, writer: asyncio.StreamWriter, line: _DelayLine, direction: _Direction
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            release, chunk = await line.get()
            wait_s = release - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            if chunk is None:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()
            line.done(chunk)
            direction.stats.bytes += len(chunk)
            direction.stats.chunks += 1


async def _all_or_none(*coros: Coroutine[Any, Any, None]) -> None:
    """Run ``coros`` as owned tasks until all finish; the first error cancels the rest."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _host_port(text: str, flag: str) -> tuple[str, int]:
    parsed = split_host_port(text, port_zero=True)
    if parsed is None:
        raise ConfigError(f"{flag} must be HOST:PORT with a port in 0..65535, got {text!r}")
    return parsed


def _config_from_argv(argv: list[str]) -> ShaperConfig:
    parser = argparse.ArgumentParser(
        prog="python -m shoal.net.shaper", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--rate-mbit", type=float, default=None, help="cap per direction, Mbit/s")
    parser.add_argument("--up-rate-mbit", type=float, default=None, help="client->target cap")
    parser.add_argument("--down-rate-mbit", type=float, default=None, help="target->client cap")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction")
    args = parser.parse_args(argv)
    listen_host, listen_port = _host_port(args.listen, "--listen")
    target_host, target_port = _host_port(args.target, "--target")
    up = args.up_rate_mbit if args.up_rate_mbit is not None else args.rate_mbit
    down = args.down_rate_mbit if args.down_rate_mbit is not None else args.rate_mbit
    return ShaperConfig(
        listen_host=listen_host,
        listen_port=listen_port,
        target_host=target_host,
        target_port=target_port,
        up_rate_bit_s=None if up is None else up * 1e6,
        down_rate_bit_s=None if down is None else down * 1e6,
        up_delay_s=args.delay_ms / 1000,
        down_delay_s=args.delay_ms / 1000,
    )


async def _run(config: ShaperConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with LinkShaper(config) as shaper:
        host, port = shaper.address
        print(f"listening {host}:{port}", flush=True)
        await stop.wait()
    print(f"closed up_bytes={shaper.up.bytes} down_bytes={shaper.down.bytes}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: run the shaper until SIGINT/SIGTERM."""
    try:
        config = _config_from_argv(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"shaper: error: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_run(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
