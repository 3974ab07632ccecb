"""Names and ownership records of testbeds, and removal of leftovers from dead runs.

Every testbed has a prefix ``sh<5 hex>-`` that starts each of its namespace and interface
names. Before creating anything it writes ``<state_dir>/<prefix>.json`` naming its owner
process (pid and start time, so a reused pid is not mistaken for the owner), whether it is
persistent (built by ``shoal testbed up`` and removed by ``down``), its namespaces and hosts.

``find_stale`` (pure) decides which prefixes seen in ``ip netns list`` belong to nobody:
no record, or a non-persistent record whose owner is gone. ``remove_stale`` deletes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shoal.testbed.netns import TestbedError, delete_netns, list_netns

__all__ = [
    "PREFIX_PATTERN",
    "Record",
    "find_stale",
    "new_prefix",
    "process_start_time",
    "read_record",
    "record_path",
    "remove_run",
    "remove_stale",
    "write_record",
]

PREFIX_PATTERN = re.compile(r"^(sh[0-9a-f]{5}-)")
_counter = 0


def new_prefix() -> str:
    """A fresh prefix, unique per process, call and time."""
    global _counter
    _counter += 1
    seed = f"{os.getpid()}-{_counter}-{time.time_ns()}".encode()
    return f"sh{hashlib.sha256(seed).hexdigest()[:5]}-"


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass(kw_only=True, slots=True)
class Record:
    """What a testbed writes about itself before it creates anything."""

    prefix: str
    pid: int
    start_time: int | None
    persistent: bool = False
    namespaces: list[str] = field(default_factory=list)
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)
    """name -> {"netns", "address", "public_address", "role"}."""

    def owner_alive(self, start_time_of: Callable[[int], int | None]) -> bool:
        started = start_time_of(self.pid)
        return started is not None and started == self.start_time


def record_path(state_dir: Path, prefix: str) -> Path:
    return state_dir / f"{prefix}.json"


def write_record(state_dir: Path, record: Record) -> Path:
    """Write atomically (temp file + rename)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = record_path(state_dir, record.prefix)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=1))
    tmp.replace(path)
    return path


def read_record(path: Path) -> Record | None:
    """The record at ``path``, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
        return Record(**data)
    except (OSError, ValueError, TypeError):
        return None


def find_stale(
    namespaces: Iterable[str],
    records: dict[str, Record | None],
    start_time_of: Callable[[int], int | None],
) -> dict[str, list[str]]:
    """Prefix -> its namespaces, for every prefix nobody owns any more (pure)."""
    stale: dict[str, list[str]] = {}
    for name in namespaces:
        match = PREFIX_PATTERN.match(name)
        if match is None:
            continue
        prefix = match.group(1)
        record = records.get(prefix)
        if record is not None and (record.persistent or record.owner_alive(start_time_of)):
            continue
        stale.setdefault(prefix, []).append(name)
    return stale


def remove_stale(state_dir: Path, *, stop_timeout_s: float = 3.0) -> list[str]:
    """Delete namespaces (and records) of dead runs; return the prefixes removed."""
    namespaces = list_netns()
    prefixes = {m.group(1) for n in namespaces if (m := PREFIX_PATTERN.match(n))}
    records = {p: read_record(record_path(state_dir, p)) for p in prefixes}
    stale = find_stale(namespaces, records, process_start_time)
    for prefix, names in stale.items():
        for name in names:
            # a race with its owner or another cleaner leaves it gone either way
            with contextlib.suppress(TestbedError):
                delete_netns(name, stop_timeout_s=stop_timeout_s)
        record_path(state_dir, prefix).unlink(missing_ok=True)
    # records of dead owners whose namespaces were already gone
    for path in state_dir.glob("sh*-.json") if state_dir.is_dir() else ():
        record = read_record(path)
        if record is None or not (record.persistent or record.owner_alive(process_start_time)):
            path.unlink(missing_ok=True)
    return sorted(stale)


def remove_run(state_dir: Path, record: Record, *, stop_timeout_s: float = 3.0) -> None:
    """Delete every namespace of ``record`` (and its processes), then the record itself."""
    present = set(list_netns())
    for name in record.namespaces:
        if name in present:
            delete_netns(name, stop_timeout_s=stop_timeout_s)
    record_path(state_dir, record.prefix).unlink(missing_ok=True)
