"""Host-side helpers for netns tests: run ``agents.py`` inside testbed hosts."""

from __future__ import annotations

import json
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shoal.testbed.host import Host

AGENTS = str(Path(__file__).with_name("agents.py"))

# the session topology (conftest.py ``bed``)
ECHO = 7000
"""Port of the echo agent on relay, server2 and slow."""
SLOW_RATE_BIT_S = 20e6
SLOW_DELAY_MS = 25.0
HOME2_DELAY_MS = 10.0


def start(host: Host, *args: object, ready_timeout_s: float = 10.0) -> subprocess.Popen[str]:
    """Start a server agent in ``host`` and wait (bounded) for its "ready" line."""
    proc = host.popen([sys.executable, AGENTS, *map(str, args)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + ready_timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if sel.select(left):
                line = proc.stdout.readline()
                if line.strip() == "ready":
                    return proc
                if not line:
                    break
    raise AssertionError(f"agent {args} in {host.name} did not get ready")


def result(proc: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
    """The JSON line a started agent prints when it finishes."""
    out, _ = proc.communicate(timeout=timeout_s)
    return json.loads(out.strip().splitlines()[-1])


def run(host: Host, *args: object, timeout_s: float = 30.0) -> dict[str, Any]:
    """Run a client agent in ``host`` to completion and return its JSON result."""
    done = host.exec([sys.executable, AGENTS, *map(str, args)], timeout_s=timeout_s)
    return json.loads(done.stdout.strip().splitlines()[-1])
