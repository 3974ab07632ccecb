"""Splicing byte streams: how punched and relayed links reach the gRPC server and channels.

- ``splice(a, b)`` copies bytes both ways between two stream pairs until both directions
  end; EOF on one side becomes ``write_eof`` on the other, an error aborts both. Buffers are
  bounded by the transports' write high-water marks (``drain``), so a slow side slows the
  other instead of growing memory.
- ``bridge_to_unix(link, path)``: the accepting side of a punched or relayed link connects
  it to the local gRPC server's unix socket; the server sees an ordinary HTTP/2 connection.
- ``LocalEndpoint(path, open_remote)``: the dialling side listens on a unix socket; a gRPC
  channel to ``unix:<path>`` connects there, and each accepted connection is spliced to the
  stream ``open_remote()`` returns (the punched socket, or a new relay stream).

All tasks are owned (a set, cancelled and awaited on ``close()``); ``close()`` is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from shoal.errors import ConfigError, NetworkError, PeerUnavailable
from shoal.net.aio import within

__all__ = ["LocalEndpoint", "SpliceStats", "Streams", "bridge_to_unix", "splice"]

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
_CHUNK_BYTES = 256 * 1024


@dataclass(slots=True)
class SpliceStats:
    a_to_b_bytes: int = 0
    b_to_a_bytes: int = 0


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, add: Callable[[int], None]
) -> None:
    while chunk := await reader.read(_CHUNK_BYTES):
        writer.write(chunk)
        await writer.drain()
        add(len(chunk))
    if writer.can_write_eof():
        writer.write_eof()


async def splice(a: Streams, b: Streams, stats: SpliceStats | None = None) -> SpliceStats:
    """Copy ``a`` -> ``b`` and ``b`` -> ``a`` until both directions end; abort both on error.

    Bytes are added to ``stats`` (a new one when None) as they are written, and it is
    returned. Both writers are closed (aborted) when this returns or is cancelled.
    """
    stats = SpliceStats() if stats is None else stats

    def add_ab(n: int) -> None:
        stats.a_to_b_bytes += n

    def add_ba(n: int) -> None:
        stats.b_to_a_bytes += n

    tasks = [
        asyncio.ensure_future(_pump(a[0], b[1], add_ab)),
        asyncio.ensure_future(_pump(b[0], a[1], add_ba)),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            with contextlib.suppress(OSError):
                task.result()  # a broken side ends the splice; anything else is a bug
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, writer in (a, b):
            writer.transport.abort()
    return stats


async def bridge_to_unix(
    link: Streams, unix_path: str, *, connect_timeout_s: float = 5.0
) -> SpliceStats:
    """Splice ``link`` into a new connection to the local server at ``unix_path``.

    Raises:
        PeerUnavailable: the local server did not accept within ``connect_timeout_s``.
    """
    try:
        local = await within(asyncio.open_unix_connection(unix_path), connect_timeout_s)
    except (OSError, asyncio.TimeoutError) as exc:
        link[1].transport.abort()
        raise PeerUnavailable(f"local server at {unix_path} did not accept: {exc!r}") from exc
    return await splice(link, local)


class LocalEndpoint:
    """A unix-socket listener whose connections are spliced to ``open_remote()`` streams."""

    def __init__(
        self,
        path: str,
        open_remote: Callable[[], Awaitable[Streams]],
        *,
        open_timeout_s: float = 10.0,
        close_timeout_s: float = 2.0,
    ) -> None:
        if not open_timeout_s > 0 or not close_timeout_s > 0:
            raise ConfigError(f"timeouts must be > 0, got {open_timeout_s!r}, {close_timeout_s!r}")
        self.path = path
        self._open_remote = open_remote
        self._open_timeout_s = open_timeout_s
        self._close_timeout_s = close_timeout_s
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.stats = SpliceStats()
        """Bytes local -> remote (``a_to_b``) and back, over all connections, live."""
        self.failed_opens = 0

    @property
    def address(self) -> str:
        """What to give a gRPC channel: ``unix:<path>``."""
        return f"unix:{self.path}"

    async def start(self) -> LocalEndpoint:
        if self._server is None:
            self._server = await asyncio.start_unix_server(self._on_accept, self.path)
        return self

    async def close(self) -> None:
        """Stop listening, abort spliced connections, remove the socket file; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self._close_timeout_s)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def reset(self) -> int:
        """Abort every spliced connection but keep listening (the channel reconnects and
        gets a new ``open_remote()`` stream); returns how many were aborted."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self._close_timeout_s)
        return len(tasks)

    async def __aenter__(self) -> LocalEndpoint:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:
            writer.transport.abort()
            return
        task = asyncio.get_running_loop().create_task(self._serve((reader, writer)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, local: Streams) -> None:
        try:
            try:
                remote = await within(self._open_remote(), self._open_timeout_s)
            except (OSError, asyncio.TimeoutError, NetworkError):
                self.failed_opens += 1
                return
            await splice(local, remote, self.stats)
        finally:
            local[1].transport.abort()
