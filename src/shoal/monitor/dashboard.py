"""The dashboard service: polls a source, keeps history, computes the view and alerts, and
serves the page and ``/api/state`` over HTTP. Runs on the caller's event loop::

    async with Dashboard(source, DashboardConfig(port=0)) as dash:
        print(dash.url)
        await stop_event.wait()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from shoal.errors import NetworkError
from shoal.monitor.alerts import Alert, compute_alerts
from shoal.monitor.config import DashboardConfig
from shoal.monitor.events import Event
from shoal.monitor.history import History, dashboard_state, view_changes
from shoal.monitor.http import DashboardHTTPServer
from shoal.monitor.sources import DashboardSource
from shoal.monitor.summary import PeerSummary
from shoal.monitor.view import SwarmView, build_view
from shoal.net.aio import within

__all__ = ["Dashboard"]

log = logging.getLogger(__name__)


class Dashboard:
    """One poll task and one HTTP server, both owned; ``aclose()`` is idempotent."""

    def __init__(
        self,
        source: DashboardSource,
        config: DashboardConfig,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._source = source
        self._config = config
        self._clock = wall_clock
        self._history = History(config.history_points)
        self._latest: dict[str, PeerSummary] = {}
        self._events: deque[Event] = deque(maxlen=config.events_kept)
        self._view = SwarmView(now=wall_clock(), peers=())
        self._alerts: list[Alert] = []
        self._http = DashboardHTTPServer(
            self.state,
            host=config.host,
            port=config.port,
            request_timeout_s=config.request_timeout_s,
        )
        self._task: asyncio.Task[None] | None = None
        self._first_poll = asyncio.Event()
        self.polls = 0
        self.poll_errors = 0

    @property
    def url(self) -> str:
        return f"http://{self._config.host}:{self._http.port}/"

    @property
    def view(self) -> SwarmView:
        return self._view

    @property
    def alerts(self) -> list[Alert]:
        return list(self._alerts)

    def state(self) -> dict[str, Any]:
        return dashboard_state(
            self._view, self._alerts, self._history, self._events, source=self._source.name
        )

    async def poll_once(self) -> None:
        """Fetch from the source (under ``poll_timeout_s``) and recompute view and alerts."""
        try:
            batch = await within(self._source.poll(), self._config.poll_timeout_s)
        except (NetworkError, OSError, asyncio.TimeoutError) as exc:
            self.poll_errors += 1
            log.warning("dashboard poll failed: %s", exc)
            batch = None
        if batch is not None:
            self._history.add(batch.summaries)
            for s in batch.summaries:
                old = self._latest.get(s.peer)
                if old is None or s.t >= old.t:
                    self._latest[s.peer] = s
            excess = len(self._latest) - self._config.max_peers
            if excess > 0:  # forget the peers silent the longest
                for s in sorted(self._latest.values(), key=lambda s: s.t)[:excess]:
                    del self._latest[s.peer]
            self._events.extend(batch.events)
        now = self._clock()
        view = build_view(self._latest.values(), now, self._config.swarm_view)
        alerts = compute_alerts(view, now, self._config.alerts)
        if not getattr(self._source, "has_events", False):
            self._events.extend(view_changes(self._view, view, self._alerts, alerts))
        self._view, self._alerts = view, alerts
        self._history.add_throughput(view)
        self.polls += 1
        self._first_poll.set()

    async def wait_first_poll(self, timeout_s: float) -> None:
        await within(self._first_poll.wait(), timeout_s)

    async def _run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self._config.poll_interval_s)

    async def start(self) -> str:
        """Bind the HTTP server and start polling; returns the page's URL."""
        await self._http.start()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="shoal-dashboard-poll"
            )
        return self.url

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await within(task, 2.0)
        await self._http.aclose()

    async def __aenter__(self) -> Dashboard:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
