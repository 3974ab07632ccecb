"""Owner of every background task on the network loop.

``spawn`` starts a task and keeps a reference until it ends; ``adopt`` registers the running
task (used for coroutines submitted from other threads). ``close`` cancels them all and
waits at most its timeout. Crashed tasks are logged, never silently lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class Supervisor:
    """A set of owned tasks on one loop; close() cancels them all (idempotent)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def tasks(self) -> frozenset[asyncio.Task[Any]]:
        return frozenset(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        """Start ``coro`` as an owned task; raises RuntimeError after close()."""
        if self._closed:
            coro.close()
            raise RuntimeError("supervisor is closed")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def adopt(self) -> asyncio.Task[Any]:
        """Register the current task (cancelled on close); returns it.

        Its outcome belongs to whoever awaits it (e.g. a thread's future), so a failure is
        not logged here.
        """
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("adopt() needs a running task")
        if self._closed:
            task.cancel()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    async def close(self, timeout_s: float) -> int:
        """Cancel every owned task and wait up to ``timeout_s``; returns tasks still alive."""
        self._closed = True
        me = asyncio.current_task()
        pending = [t for t in self._tasks if t is not me]
        for task in pending:
            task.cancel()
        if pending:
            _, alive = await asyncio.wait(pending, timeout=timeout_s)
            for task in alive:
                log.warning("task %s ignored cancellation", task.get_name())
            return len(alive)
        return 0


__all__ = ["Supervisor"]
