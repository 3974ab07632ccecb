"""Where the dashboard gets its data: a :class:`DashboardSource` yields, per poll, the
summaries now readable and any new events.

- :class:`StoreSource`: any :class:`~shoal.monitor.publish.SummaryStore` (the DHT binding
  for ``shoal monitor --join``; an in-memory store in tests). No events.
- :class:`EventLogSource`: the JSONL logs of local peers (``shoal monitor --events``).
  Summary events become summaries; the rest are shown as events. The first poll replays the
  whole log (with rotated files), so charts start at the beginning of the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from shoal.errors import ProtocolViolation
from shoal.monitor.events import Event, EventKind, EventTail, read_events, rotated_paths
from shoal.monitor.publish import SummaryStore
from shoal.monitor.summary import PeerSummary, summary_from_dict

__all__ = ["DashboardSource", "EventLogSource", "SourceBatch", "StoreSource"]


@dataclass(slots=True)
class SourceBatch:
    summaries: list[PeerSummary] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


class DashboardSource(Protocol):
    name: str
    """Shown on the page."""
    has_events: bool
    """False: the dashboard derives events from view changes (peers seen/stale, alerts)."""

    async def poll(self) -> SourceBatch: ...


class StoreSource:
    has_events = False

    def __init__(self, store: SummaryStore, name: str = "swarm") -> None:
        self._store = store
        self.name = name

    async def poll(self) -> SourceBatch:
        return SourceBatch(summaries=await self._store.fetch())


def split_events(events: Sequence[Event]) -> SourceBatch:
    batch = SourceBatch()
    for e in events:
        if e.kind == EventKind.SUMMARY.value:
            try:
                batch.summaries.append(summary_from_dict(e.fields))
            except ProtocolViolation:
                continue
        else:
            batch.events.append(e)
    return batch


class EventLogSource:
    """Follows one or more event logs. File reads run in a worker thread."""

    has_events = True

    def __init__(self, paths: Sequence[Path], *, backups: int = 3) -> None:
        self._paths = [Path(p) for p in paths]
        self._backups = backups
        self._tails: list[EventTail] | None = None
        self.name = "events: " + ", ".join(p.name for p in self._paths)

    def _read(self) -> list[Event]:
        if self._tails is None:
            # First poll: replay rotated files, then follow each live file from its end.
            events: list[Event] = []
            self._tails = []
            for path in self._paths:
                old = rotated_paths(path, self._backups)[:-1]
                for member in old:
                    events.extend(read_events([member]))
                tail = EventTail(path)
                events.extend(tail.poll())
                self._tails.append(tail)
            return events
        out: list[Event] = []
        for tail in self._tails:
            out.extend(tail.poll())
        return out

    async def poll(self) -> SourceBatch:
        events = await asyncio.to_thread(self._read)
        events.sort(key=lambda e: e.t)
        return split_events(events)
