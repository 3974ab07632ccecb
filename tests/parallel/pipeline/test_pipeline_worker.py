"""The stage server's compute thread."""

from __future__ import annotations

import asyncio
import threading

from shoal.parallel.pipeline.worker import BACKWARD, FORWARD, ComputeWorker


def test_a_job_that_outlives_its_loop_does_not_stop_the_worker():
    # A server killed with a job running closes its loop first; handing the job's result
    # to that loop raised in the compute thread, which died with it.
    worker = ComputeWorker("test-worker")
    started, release = threading.Event(), threading.Event()

    def slow() -> int:
        started.set()
        assert release.wait(10)
        return 1

    loop = asyncio.new_event_loop()
    loop.run_until_complete(_submit(worker, FORWARD, slow))
    assert started.wait(10)
    loop.close()
    release.set()

    async def later() -> int:
        return await asyncio.wait_for(worker.submit(BACKWARD, lambda: 2), 10)

    try:
        assert asyncio.run(later()) == 2  # the thread lives on
    finally:
        worker.close()


async def _submit(worker, priority, fn):
    worker.submit(priority, fn)  # not awaited: the loop goes before the job ends
