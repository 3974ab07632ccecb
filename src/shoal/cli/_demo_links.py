"""The demo's shaped links: one ``LinkShaper`` per peer on a private event-loop thread.

Each training peer is reached only through its shaper (a loopback TCP proxy with a token
bucket and a one-way delay per direction), so every byte between peers crosses an
internet-like link: what a peer receives pays the cap and the delay of its own link, and
so do its answers. ``Links.add(target_port)`` returns the address the peer must announce;
``close()`` stops every shaper within a bounded time and is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import Future
from typing import Any

from shoal.net.shaper import LinkShaper, ShaperConfig

__all__ = ["Links"]


class Links:
    """Shapers on one background loop; see the module docstring."""

    def __init__(self, *, rate_mbit: float, delay_ms: float, timeout_s: float = 5.0) -> None:
        self.rate_bit_s = rate_mbit * 1e6
        self.delay_s = delay_ms / 1000.0
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="demo-links", daemon=True
        )
        self._thread.start()
        self._shapers: list[LinkShaper] = []
        self._closed = False

    def _run(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout=self.timeout_s)

    def add(self, target_port: int, host: str = "127.0.0.1") -> str:
        """A shaper in front of ``host:target_port``; returns its ``host:port``."""
        shaper = LinkShaper(
            ShaperConfig(
                target_host=host,
                target_port=target_port,
                listen_host=host,
                up_rate_bit_s=self.rate_bit_s,
                down_rate_bit_s=self.rate_bit_s,
                up_delay_s=self.delay_s,
                down_delay_s=self.delay_s,
            )
        )
        self._run(shaper.start())
        self._shapers.append(shaper)
        h, p = shaper.address
        return f"{h}:{p}"

    def carried_bytes(self) -> int:
        """Bytes delivered through every shaper, both directions."""
        total = 0
        for s in self._shapers:
            for d in (s.up, s.down):
                total += int(getattr(d, "bytes", 0))
        return total

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for s in self._shapers:
                with contextlib.suppress(Exception):  # keep closing the rest
                    self._run(s.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=self.timeout_s)
            if not self._thread.is_alive():
                self._loop.close()
