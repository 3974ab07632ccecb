"""A small owner for background tasks: every task it starts is cancelled on ``close``.

``asyncio.TaskGroup`` cancels everything when one child fails, which is wrong for a node's
independent side jobs (liveness pings, republishing); this keeps references, logs failures,
and shuts down within a bounded time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

__all__ = ["TaskOwner"]

_log = logging.getLogger(__name__)


class TaskOwner:
    """Holds the tasks it spawns; ``close`` cancels them and waits at most ``timeout_s``."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any] | None:
        """Start ``coro`` as an owned task; returns None (and closes it) after ``close``."""
        if self._closed:
            coro.close()
            return None
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.warning("%s: background task failed", self._name, exc_info=task.exception())

    async def close(self, timeout_s: float = 2.0) -> None:
        """Cancel every task and wait for them; safe to call twice."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
