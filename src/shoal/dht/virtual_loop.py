"""An asyncio event loop on virtual time, for simulations and fake-clock tests.

``loop.time()`` starts at 0 and, whenever nothing is ready to run, jumps straight to the
next timer instead of sleeping. Code under test keeps using ``asyncio.sleep``, ``wait_for``
and timeouts unchanged; an hour of simulated traffic costs only the CPU it needs. Real I/O
still works (the selector is polled without blocking), so ``call_soon_threadsafe`` from
other threads is served.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["VirtualClockLoop", "run_virtual"]

T = TypeVar("T")
_POLL_EVERY = 64


class _VirtualSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.clock: VirtualClockLoop | None = None
        self._skipped = 0

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout == 0:
            # Work is ready: poll real I/O only now and then (it is rare in simulations).
            self._skipped += 1
            if self._skipped < _POLL_EVERY:
                return []
        self._skipped = 0
        events = super().select(0)
        if events or timeout is None or self.clock is None:
            return events if events or timeout is not None else super().select(None)
        if timeout > 0:
            self.clock.advance(timeout)
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose clock advances only when it would otherwise sleep."""

    def __init__(self, start_s: float = 0.0) -> None:
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.clock = self
        self._virtual_now = start_s

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        self._virtual_now += seconds


def run_virtual(coro: Coroutine[Any, Any, T], start_s: float = 0.0) -> T:
    """Run ``coro`` to completion on a fresh ``VirtualClockLoop``, then close the loop."""
    loop = VirtualClockLoop(start_s)
    try:
        return loop.run_until_complete(coro)
    finally:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
