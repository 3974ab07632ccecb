"""`shoal peer --role stage --tp 2`: a stage server backed by a tensor-parallel group."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def _read_event(proc: subprocess.Popen[str], event: str, timeout_s: float) -> dict:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                continue
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("event") == event:
                    return record
    raise AssertionError(f"no {event!r} line within {timeout_s} s (exit {proc.poll()})")


def test_tp_stage_server_starts_its_ranks_and_stops_cleanly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shoal.cli.main",
            "peer",
            "--role",
            "stage",
            "--stage",
            "0",
            "--tp",
            "2",
            "--run-dir",
            str(tmp_path),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        listening = _read_event(proc, "listening", timeout_s=180)
        assert listening["tp"] == "2" and listening["stage"] == "0"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
