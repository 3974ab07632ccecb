"""Child processes of ``shoal demo``: started, watched and always taken down.

``Children`` owns every process the demo starts. Each child runs in its own session (so a
terminal Ctrl-C reaches only the demo, which then decides), its stdout lines arrive on one
shared queue as ``Line(name, incarnation, text, at_s)`` (``text`` None = end of output), its
stderr goes to ``<run-dir>/logs/<name>.<incarnation>.err``. ``close()`` sends SIGTERM to
every live process group, waits up to ``term_timeout_s`` and then sends SIGKILL; it is
idempotent and bounded in time, and ``pids`` lists every process ever started so callers
can check that none is left.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["Children", "Line"]


@dataclass(frozen=True, slots=True)
class Line:
    """One stdout line of a child (``text`` None: its stdout closed)."""

    name: str
    incarnation: int
    text: str | None
    at_s: float
    """``time.monotonic()`` when the line was read."""


class Children:
    """The demo's processes; see the module docstring."""

    def __init__(self, log_dir: Path, *, term_timeout_s: float = 5.0) -> None:
        self.log_dir = log_dir
        self.term_timeout_s = term_timeout_s
        self.lines: queue.Queue[Line] = queue.Queue()
        self.pids: list[int] = []
        self._procs: dict[str, subprocess.Popen[str]] = {}
        self._incarnations: dict[str, int] = {}
        self._errs: list[IO[str]] = []
        self._lock = threading.Lock()
        self._closed = False
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        """Start ``argv`` as child ``name`` (a restart bumps its incarnation); returns it."""
        with self._lock:
            if self._closed:
                raise RuntimeError("children are closed")
            old = self._procs.get(name)
            if old is not None and old.poll() is None:
                raise RuntimeError(f"{name} is still running")
            inc = self._incarnations.get(name, -1) + 1
            self._incarnations[name] = inc
            err = open(self.log_dir / f"{name}.{inc}.err", "w")  # noqa: SIM115 - closed in close()
            self._errs.append(err)
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                bufsize=1,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
            self._procs[name] = proc
            self.pids.append(proc.pid)
        reader = threading.Thread(
            target=self._read, args=(name, inc, proc), name=f"demo-{name}", daemon=True
        )
        reader.start()
        return inc

    def _read(self, name: str, inc: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        try:
            for text in proc.stdout:
                self.lines.put(Line(name, inc, text.rstrip("\n"), time.monotonic()))
        except (OSError, ValueError):
            pass
        self.lines.put(Line(name, inc, None, time.monotonic()))

    def pid(self, name: str) -> int:
        return self._procs[name].pid

    def alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def returncode(self, name: str) -> int | None:
        proc = self._procs.get(name)
        return None if proc is None else proc.poll()

    def kill(self, name: str, timeout_s: float = 5.0) -> None:
        """SIGKILL child ``name`` (its whole process group) and reap it within ``timeout_s``."""
        proc = self._procs[name]
        _signal_group(proc, signal.SIGKILL)
        proc.wait(timeout=timeout_s)

    def stderr_tail(self, name: str, chars: int = 1500) -> str:
        inc = self._incarnations.get(name, 0)
        try:
            text = (self.log_dir / f"{name}.{inc}.err").read_text(errors="replace")
        except OSError:
            return ""
        return text[-chars:]

    def close(self) -> None:
        """SIGTERM every live child, SIGKILL what is left after the deadline; reap all."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            procs = list(self._procs.values())
        for proc in procs:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.term_timeout_s
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for proc in procs:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL cannot be ignored
                proc.wait(timeout=self.term_timeout_s)
            _signal_group(proc, signal.SIGKILL)  # stray grandchildren of a finished child
        for err in self._errs:
            err.close()


def _signal_group(proc: subprocess.Popen[str], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
