"""A minimal HTTP/1.1 server on asyncio for the dashboard: GET only, one request per
connection, bounded request size and time.

Routes: ``/`` and ``/static/NAME`` serve files from this package's ``static/`` folder (only
names that exist there); ``/api/state`` returns the JSON of a callback. Anything else is
404. No third-party dependency; the page it serves loads nothing from outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shoal.net.aio import within

__all__ = ["STATIC_DIR", "DashboardHTTPServer"]

STATIC_DIR = Path(__file__).with_name("static")
_MAX_REQUEST_BYTES = 16 * 1024
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


class DashboardHTTPServer:
    """Serves the static page and ``/api/state`` on the running loop."""

    def __init__(
        self,
        state: Callable[[], dict[str, Any]],
        *,
        host: str,
        port: int,
        request_timeout_s: float,
        static_dir: Path = STATIC_DIR,
    ) -> None:
        self._state = state
        self._host = host
        self._port = port
        self._timeout_s = request_timeout_s
        self._static = {
            p.name: p for p in static_dir.iterdir() if p.is_file() and _NAME_RE.match(p.name)
        }
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> int:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._handle, self._host, self._port, limit=_MAX_REQUEST_BYTES
            )
        return self.port

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await within(server.wait_closed(), 2.0)

    def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        path = path.split("?", 1)[0]
        if path == "/api/state":
            body = json.dumps(self._state(), separators=(",", ":"), allow_nan=False)
            return 200, "application/json", body.encode()
        name = "index.html" if path in ("/", "/index.html") else None
        if path.startswith("/static/"):
            name = path[len("/static/") :]
        if name is not None and name in self._static:
            file = self._static[name]
            return 200, _TYPES.get(file.suffix, "application/octet-stream"), file.read_bytes()
        return 404, "text/plain", b"not found\n"

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, str] | None:
        head = await reader.readuntil(b"\r\n\r\n")
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return None
        return parts[0], parts[1]

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After refusing a request, read (bounded) what the client still sends, so closing
        does not reset the connection before it has read the answer."""
        if writer.can_write_eof():
            writer.write_eof()

        async def drain_input() -> None:
            for _ in range(16):
                if not await reader.read(16 * 1024):
                    return

        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            await within(drain_input(), 1.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                request = await within(self._read_request(reader), self._timeout_s)
            except (
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ValueError,
                asyncio.TimeoutError,
            ):
                request = None
            if request is None:
                status, ctype, body = 400, "text/plain", b"bad request\n"
                method = "GET"
            else:
                method, path = request
                status, ctype, body = self._route(method, path)
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(head if method == "HEAD" else head + body)
            await within(writer.drain(), self._timeout_s)
            if request is None:
                await self._linger(reader, writer)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                await within(writer.wait_closed(), 1.0)
