"""``within``: ``asyncio.wait_for`` that never loses a cancellation.

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
from typing import TypeVar

__all__ = ["within"]

T = TypeVar("T")


async def within(aw: Awaitable[T], timeout_s: float | None) -> T:
    """``await aw``, raising ``TimeoutError`` after ``timeout_s`` (None: no limit); on a
    timeout or a cancellation, ``aw`` is cancelled (as by ``asyncio.wait_for``)."""
    if sys.version_info < (3, 11):  # pragma: no cover - no asyncio.timeout before 3.11
        return await asyncio.wait_for(aw, timeout_s)
    async with asyncio.timeout(timeout_s):
        return await aw
