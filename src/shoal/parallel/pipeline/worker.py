"""The compute thread of a stage server: one thread, a priority queue, asyncio futures.

Every touch of the stage's parameters (forward, backward, optimizer step, loading, averaging
write-back) runs here, one job at a time, so no lock guards the model. Backward jobs go before
forward jobs (they free saved activations and finish micro-batches that are already paid
for). ``submit`` is called on the network loop and returns an awaitable future.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["BACKWARD", "CONTROL", "FORWARD", "ComputeWorker"]

T = TypeVar("T")
CONTROL, BACKWARD, FORWARD = 0, 1, 2
_STOP = (-1, -1, None, None, None)


class ComputeWorker:
    """One daemon thread running submitted callables by priority (lower first), FIFO within."""

    def __init__(self, name: str) -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, Any, Any, Any]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def submit(self, priority: int, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn`` on the compute thread; await the returned future on the loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if self._closed:
            future.set_exception(RuntimeError("compute worker is closed"))
            return future
        self._queue.put((priority, next(self._seq), fn, future, loop))
        return future

    def _main(self) -> None:
        while True:
            priority, _, fn, future, loop = self._queue.get()
            if priority < 0:
                return
            if future.cancelled():
                continue
            try:
                result, error = fn(), None
            except BaseException as exc:  # handed to the awaiting coroutine
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(_set, future, result, error)
            except RuntimeError:  # the loop closed while the job ran: nobody awaits it
                continue

    def close(self, timeout_s: float = 1.0) -> None:
        """Stop after the running job; queued jobs are dropped. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout_s)


def _set(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
