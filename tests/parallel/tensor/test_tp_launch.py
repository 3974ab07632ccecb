"""Launcher failure paths: a failing rank, a missed deadline, a launcher killed with -9."""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tp_rank_checks as rc

from shoal.errors import ConfigError
from shoal.parallel.tensor import LaunchConfig, TPGroupError, launch_tp_group

HERE = Path(__file__).resolve().parent


def _no_rank_children() -> bool:
    return not [p for p in multiprocessing.active_children() if p.name.startswith("shoal-tp")]


def _wait_exit(pid: int, timeout_s: float) -> bool:
    """Wait on a pidfd (an event, not a poll) until ``pid`` exits; False on timeout."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout_s)
        return bool(ready)
    finally:
        os.close(fd)


def _pids(pid_dir: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(pid_dir.glob("rank*.pid"))]


def test_bad_world_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        launch_tp_group(0, rc.hang, ("x",))


@pytest.mark.slow
def test_failing_rank_is_reported_and_the_hung_rank_killed(tmp_path: Path) -> None:
    cfg = LaunchConfig(init_timeout_s=120.0, run_timeout_s=240.0, terminate_grace_s=1.0)
    start = time.monotonic()
    with pytest.raises(TPGroupError) as info:
        launch_tp_group(2, rc.fail_on_rank1, (str(tmp_path),), config=cfg)
    assert info.value.rank == 1
    assert "deliberate failure on rank 1" in str(info.value)
    assert time.monotonic() - start < 240.0
    pids = _pids(tmp_path)
    assert len(pids) == 2
    assert all(_wait_exit(pid, 0.0) for pid in pids)  # already gone when the error is raised
    assert _no_rank_children()


def test_deadline_stops_every_rank(tmp_path: Path) -> None:
    cfg = LaunchConfig(run_timeout_s=1.5, terminate_grace_s=1.0)
    start = time.monotonic()
    with pytest.raises(TPGroupError, match="missed the deadline"):
        launch_tp_group(2, rc.hang, (str(tmp_path),), config=cfg)
    # deadline + SIGTERM/SIGKILL grace, plus room for a loaded machine to reap the ranks
    assert time.monotonic() - start < 1.5 + 4 * 1.0 + 10.0
    assert _no_rank_children()


@pytest.mark.slow
def test_ranks_die_with_a_killed_launcher(tmp_path: Path) -> None:
    fifo = tmp_path / "ready.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    keep_open = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # no EOF before the ranks write
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    parent = subprocess.Popen(
        [sys.executable, str(HERE / "tp_orphan_parent.py"), str(tmp_path)], env=env
    )
    try:
        deadline = time.monotonic() + 180.0
        data = b""
        while data.count(b"\n") < 2:  # both ranks up (each writes its pid), or give up
            remaining = deadline - time.monotonic()
            assert remaining > 0, "ranks did not start"
            ready, _, _ = select.select([reader], [], [], remaining)
            if ready:
                data += os.read(reader, 4096)
        pids = [int(line) for line in data.split()]
        assert parent.poll() is None
        parent.send_signal(signal.SIGKILL)
        parent.wait(10.0)
        assert all(_wait_exit(pid, 10.0) for pid in pids)
    finally:
        os.close(reader)
        os.close(keep_open)
        if parent.poll() is None:
            parent.kill()
            parent.wait(10.0)
