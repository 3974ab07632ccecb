"""``within``: ``asyncio.wait_for`` that never loses a cancellation; ``IdleTimeout``: a
time limit that moves with progress.

Up to Python 3.11, ``asyncio.wait_for`` returns the inner result when a cancellation
arrives in the same loop iteration as that result (CPython gh-86296): the task that was
told to stop runs on. A background loop then outlives its owner's ``close`` (and is
destroyed pending when the event loop closes), and a round outlives its peer's stop.
Python 3.12 rebuilt ``wait_for`` on ``asyncio.timeout``, which counts cancellations; this
uses ``asyncio.timeout`` on 3.11 as well (3.10 has none and keeps ``wait_for``).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from types import TracebackType
from typing import TypeVar

__all__ = ["IdleTimeout", "within"]

T = TypeVar("T")


async def within(aw: Awaitable[T], timeout_s: float | None) -> T:
    """``await aw``, raising ``TimeoutError`` after ``timeout_s`` (None: no limit); on a
    timeout or a cancellation, ``aw`` is cancelled (as by ``asyncio.wait_for``)."""
    if sys.version_info < (3, 11):  # pragma: no cover - no asyncio.timeout before 3.11
        try:
            return await asyncio.wait_for(aw, timeout_s)
        except asyncio.TimeoutError:  # not the builtin before 3.11: callers catch that one
            raise TimeoutError(f"not done within {timeout_s:g} s") from None
    async with asyncio.timeout(timeout_s):
        return await aw


class IdleTimeout:
    """``async with IdleTimeout(idle_s) as idle:`` raises ``TimeoutError`` out of the body
    once ``idle_s`` pass without :meth:`progress`, or at once after :meth:`expire`.

    For a stream read piece by piece: a total time limit would end a slow but honest
    sender, and none lets a stalled one hold what it reserved for ever. Noting progress is
    one float assignment (a check is scheduled only when the limit would be due). A
    cancellation from outside stays a cancellation.
    """

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self.fired = False
        self.expired = False
        self._exited = False
        self._last = 0.0
        self._task: asyncio.Task[object] | None = None
        self._handle: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> IdleTimeout:
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._last = loop.time()
        self._handle = loop.call_at(self._last + self.idle_s, self._check)
        return self

    def progress(self) -> None:
        self._last = asyncio.get_running_loop().time()

    def expire(self) -> None:
        """Give up now (e.g. what is being received is no longer wanted): ``expired`` then
        says so, where ``fired`` alone would not tell it from a stall."""
        if not self.fired and not self._exited:
            self.expired = True
        self._fire()

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        due = self._last + self.idle_s
        if loop.time() >= due:
            self._fire()
        else:
            self._handle = loop.call_at(due, self._check)

    def _fire(self) -> None:
        # Not once the body is over: the task would be cancelled wherever it is then.
        if not self.fired and not self._exited and self._task is not None:
            self.fired = True
            self._task.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exited = True
        if self._handle is not None:
            self._handle.cancel()
        if not self.fired or exc_type is not asyncio.CancelledError:
            return
        if sys.version_info >= (3, 11):
            assert self._task is not None
            if self._task.uncancel() > 0:
                return  # cancelled from outside as well: that one wins
        raise TimeoutError(f"no progress for {self.idle_s:g} s") from exc
