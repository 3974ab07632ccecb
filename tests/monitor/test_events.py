import json
import threading
from pathlib import Path

import pytest

from shoal.errors import ConfigError
from shoal.monitor.config import EventLogConfig
from shoal.monitor.events import Event, EventKind, EventLog, EventTail, read_events

from .fakes import FakeClock


def _log(path: Path, **kw) -> EventLog:
    return EventLog(EventLogConfig(path=path, **kw), peer="shme", clock=FakeClock(1000.0))


def test_one_json_object_per_line_with_time_peer_kind_fields(tmp_path):
    path = tmp_path / "events.jsonl"
    log = _log(path)
    log.emit(EventKind.JOIN, other="shyou", addr="127.0.0.1:1")
    log.emit("round", round=3, duration_s=float("nan"))
    log.close()
    log.close()
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {
        "t": 1000.0,
        "peer": "shme",
        "kind": "join",
        "fields": {"other": "shyou", "addr": "127.0.0.1:1"},
    }
    assert json.loads(lines[1])["fields"] == {"round": 3, "duration_s": "nan"}
    with pytest.raises(ValueError):
        _log(tmp_path / "other.jsonl").emit("Bad Kind")


def test_rotation_bounds_size_and_keeps_newest_backups(tmp_path):
    path = tmp_path / "events.jsonl"
    log = _log(path, max_bytes=2048, backups=2)
    for i in range(200):
        log.emit("round", round=i, pad="x" * 40)
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    for f in tmp_path.iterdir():
        assert f.stat().st_size <= 2048
    rounds = [e.fields["round"] for e in read_events([path], backups=2)]
    assert rounds == list(range(rounds[0], 200))  # contiguous, oldest lost, newest kept
    assert 0 < rounds[0] < 200 - 2 * 2048 // 120


def test_oversized_record_is_replaced_by_a_marker(tmp_path):
    path = tmp_path / "events.jsonl"
    log = _log(path, max_record_bytes=256)
    event = log.emit("failure", error="e" * 1000)
    log.close()
    assert event.fields["truncated"] > 1000
    [read] = read_events([path])
    assert read.kind == "failure" and "error" not in read.fields


def test_reader_skips_torn_last_line_and_garbage(tmp_path):
    path = tmp_path / "events.jsonl"
    good = Event(1.0, "shme", "join", {"a": 1}).to_json()
    path.write_text(good + "\n" + "not json\n" + '["list"]\n' + good + "\n" + good[:20])
    events = list(read_events([path, tmp_path / "missing.jsonl"]))
    assert events == [Event(1.0, "shme", "join", {"a": 1})] * 2


def test_tail_returns_only_complete_new_lines_and_follows_rotation(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.poll() == []
    line = Event(1.0, "shme", "join", {}).to_json() + "\n"
    with open(path, "w") as f:
        f.write(line + line[:10])
        f.flush()
        assert len(tail.poll()) == 1
        assert tail.poll() == []
        f.write(line[10:])
        f.flush()
        assert len(tail.poll()) == 1  # the torn line completed
    path.rename(tmp_path / "events.jsonl.1")
    path.write_text(line * 3)
    assert len(tail.poll()) == 3


def test_concurrent_writers_never_interleave(tmp_path):
    path = tmp_path / "events.jsonl"
    log = _log(path, max_bytes=64 * 1024, backups=10)

    def write(n: int) -> None:
        for i in range(300):
            log.emit("retry", writer=n, attempt=i, pad="y" * 50)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    log.close()
    events = list(read_events([path], backups=10))
    assert len(events) == 1200
    for n in range(4):
        assert [e.fields["attempt"] for e in events if e.fields["writer"] == n] == list(range(300))


def test_hook_sees_every_event_and_no_path_means_no_file(tmp_path):
    seen = []
    log = EventLog(EventLogConfig(path=None), peer="shme")
    log.on_event = seen.append
    log.emit("checkpoint", step=5)
    log.close()
    assert [e.fields for e in seen] == [{"step": 5}]
    assert list(tmp_path.iterdir()) == []


def test_config_is_checked():
    with pytest.raises(ConfigError, match="max_bytes"):
        EventLogConfig(max_bytes=10)
    with pytest.raises(ConfigError, match="backups"):
        EventLogConfig(backups=-1)


def test_event_log_source_replays_rotated_files_then_follows(tmp_path):
    import asyncio

    from shoal.monitor.sources import EventLogSource
    from shoal.monitor.summary import PeerSummary

    path = tmp_path / "events.jsonl"
    log = _log(path, max_bytes=4096, backups=3)
    for step in range(30):
        log.emit("summary", **PeerSummary(peer="shme", t=float(step), step=step).to_dict())
    log.emit("join", other="shyou")
    assert (tmp_path / "events.jsonl.2").exists()
    source = EventLogSource([path], backups=3)
    first = asyncio.run(source.poll())
    steps = [s.step for s in first.summaries]
    assert steps == list(range(steps[0], 30)) and steps[0] < 10
    assert [e.kind for e in first.events] == ["join"]
    log.emit("summary", **PeerSummary(peer="shme", t=31.0, step=31).to_dict())
    log.close()
    assert [s.step for s in asyncio.run(source.poll()).summaries] == [31]
