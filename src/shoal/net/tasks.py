"""``TaskSet``: the background tasks one component owns, cancelled together on close.

For a component's independent side jobs (liveness pings, republishing, relay reservations):
``asyncio.TaskGroup`` would cancel them all when one fails; this keeps references, logs
failures and shuts down within a bounded time. With ``spawner=runtime.spawn`` the runtime's
supervisor owns the tasks as well, so closing the runtime first still cancels them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["TaskSet"]

_log = logging.getLogger(__name__)
T = TypeVar("T")


class TaskSet:
    """Spawn owned tasks on the running loop; ``close`` cancels and awaits them (bounded)."""

    def __init__(
        self,
        name: str,
        spawner: Callable[..., asyncio.Task[Any]] | None = None,
        *,
        failure_log_level: int = logging.INFO,
    ) -> None:
        self.name = name
        self._spawner = spawner
        self._failure_log_level = failure_log_level
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        if self.closed:
            coro.close()
            raise RuntimeError(f"{self.name} is closed")
        if self._spawner is not None:
            task: asyncio.Task[T] = self._spawner(coro, name=name)
        else:
            task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.log(
                self._failure_log_level,
                "%s: task %s failed",
                self.name,
                task.get_name(),
                exc_info=task.exception(),
            )

    async def close(self, timeout_s: float = 2.0) -> None:
        """Cancel every task and wait for them up to ``timeout_s``; idempotent."""
        self.closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
