"""The append-only JSONL event log of one peer, and readers for it.

One event per line, one JSON object per event::

    {"t": 1764251530.12, "peer": "shx5k...", "kind": "round", "fields": {"round": 7, ...}}

``t`` is wall-clock time (seconds since the epoch), ``peer`` the writer's PeerID in text
form, ``kind`` one of :class:`EventKind` (or another lowercase word), ``fields`` free-form
JSON. Writes are thread-safe and flushed per event. Before a write would make the file
larger than ``max_bytes``, the file is renamed to ``PATH.1`` (older ones shift to ``.2`` ..
``.N``; the oldest is deleted) and a new one started.

A process killed mid-write leaves a torn last line; :func:`read_events` and
:class:`EventTail` skip it (and any other line that is not a valid event) instead of failing.
"""

from __future__ import annotations

import enum
import itertools
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from shoal.monitor.config import EventLogConfig

__all__ = ["Event", "EventKind", "EventLog", "EventTail", "read_events", "rotated_paths"]

_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_MAX_LINE_READ = 1024 * 1024


class EventKind(str, enum.Enum):
    """The vocabulary of events. Other lowercase kinds are allowed but should be added here."""

    START = "start"
    STOP = "stop"
    JOIN = "join"
    LEAVE = "leave"
    ROUND = "round"
    FAILURE = "failure"
    RETRY = "retry"
    CHECKPOINT = "checkpoint"
    STAGE_CHANGE = "stage_change"
    VALIDATION = "validation"
    SUMMARY = "summary"


@dataclass(frozen=True, slots=True)
class Event:
    """One line of the log."""

    t: float
    peer: str
    kind: str
    fields: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {"t": self.t, "peer": self.peer, "kind": self.kind, "fields": self.fields},
            separators=(",", ":"),
            default=str,
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, line: str | bytes) -> Event | None:
        """Parse one line; ``None`` when it is not a well-formed event."""
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(obj, dict):
            return None
        t, peer, kind, fields = obj.get("t"), obj.get("peer"), obj.get("kind"), obj.get("fields")
        if not isinstance(t, (int, float)) or isinstance(t, bool):
            return None
        if not isinstance(peer, str) or not isinstance(kind, str):
            return None
        if fields is None:
            fields = {}
        if not isinstance(fields, dict):
            return None
        return cls(t=float(t), peer=peer, kind=kind, fields=fields)


def _clean(value: Any) -> Any:
    """Make ``value`` strict JSON: non-finite floats become strings."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def rotated_paths(path: Path, backups: int) -> list[Path]:
    """The files of one log, oldest first: ``PATH.N`` .. ``PATH.1``, ``PATH``."""
    return [path.with_name(f"{path.name}.{i}") for i in range(backups, 0, -1)] + [path]


class EventLog:
    """Thread-safe appender with size-bounded rotation. ``close()`` is idempotent."""

    def __init__(
        self,
        config: EventLogConfig,
        *,
        peer: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._peer = peer
        self._clock = clock
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        self._size = 0
        self._closed = False
        self.on_event: Callable[[Event], None] | None = None
        """Called (outside the lock) after every event; the metrics hook in here."""
        if config.path is not None:
            config.path.parent.mkdir(parents=True, exist_ok=True)
            self._open()

    @property
    def path(self) -> Path | None:
        return self._config.path

    def _open(self) -> None:
        assert self._config.path is not None
        self._file = open(self._config.path, "ab")  # noqa: SIM115 - owned, closed in close()
        self._size = self._file.tell()

    def _rotate(self) -> None:
        assert self._config.path is not None and self._file is not None
        self._file.close()
        paths = rotated_paths(self._config.path, self._config.backups)
        if self._config.backups == 0:
            self._config.path.unlink(missing_ok=True)
        else:
            paths[0].unlink(missing_ok=True)
            for older, newer in itertools.pairwise(paths):
                if newer.exists():
                    os.replace(newer, older)
        self._open()

    def emit(self, kind: str | EventKind, **fields: Any) -> Event:
        """Append one event and return it. Raises ValueError for a malformed ``kind``."""
        kind_text = kind.value if isinstance(kind, EventKind) else kind
        if not _KIND_RE.match(kind_text):
            raise ValueError(f"event kind must match {_KIND_RE.pattern}, got {kind_text!r}")
        event = Event(t=self._clock(), peer=self._peer, kind=kind_text, fields=_clean(fields))
        line = (event.to_json() + "\n").encode()
        if len(line) > min(self._config.max_record_bytes, self._config.max_bytes):
            event = Event(event.t, event.peer, event.kind, {"truncated": len(line)})
            line = (event.to_json() + "\n").encode()
        with self._lock:
            if self._file is not None and not self._closed:
                if self._size > 0 and self._size + len(line) > self._config.max_bytes:
                    self._rotate()
                self._file.write(line)
                self._file.flush()
                self._size += len(line)
        hook = self.on_event
        if hook is not None:
            hook(event)
        return event

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._file is not None:
                self._file.close()
                self._file = None


def _parse_lines(data: bytes) -> Iterator[Event]:
    for raw in data.split(b"\n"):
        if raw.strip():
            event = Event.from_json(raw)
            if event is not None:
                yield event


def read_events(paths: Iterable[Path], *, backups: int = 0) -> Iterator[Event]:
    """Every well-formed event of the given logs, file by file, oldest rotated file first.

    Lines that do not parse (a torn last line, garbage) are skipped; missing files are
    treated as empty.
    """
    for path in paths:
        for member in rotated_paths(Path(path), backups):
            try:
                data = member.read_bytes()
            except FileNotFoundError:
                continue
            if data and not data.endswith(b"\n"):
                data = data[: data.rfind(b"\n") + 1]  # drop the torn tail
            yield from _parse_lines(data)


class EventTail:
    """Incremental reader of one growing log: each :meth:`poll` returns the complete lines
    added since the last one. Restarts from the beginning when the file was rotated or
    truncated (its inode changed or it shrank). A partial last line waits for its newline."""

    def __init__(self, path: Path, *, max_read_bytes: int = 8 * 1024 * 1024) -> None:
        self.path = Path(path)
        self._max_read = max_read_bytes
        self._offset = 0
        self._inode: int | None = None

    def poll(self) -> list[Event]:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != self._inode or st.st_size < self._offset:
                    self._inode, self._offset = st.st_ino, 0
                f.seek(self._offset)
                data = f.read(self._max_read)
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) >= _MAX_LINE_READ:  # an endless line: skip it rather than stall
                self._offset += len(data)
            return []
        self._offset += end + 1
        return list(_parse_lines(data[: end + 1]))
