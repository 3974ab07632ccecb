"""Shared by tests that run real ``shoal peer --json`` processes (loopback or netns).

``tiny_peer_argv`` is a DiLoCo peer small enough to run rounds within seconds on 2 cores;
``write_tiny_corpus`` gives it text files to train on; ``PeerEvents`` reads the JSON lines
a peer prints and waits (bounded) for one that matches.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


def tiny_peer_argv(run_dir: Path, data_dir: Path, swarm: str, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "shoal.cli.main", "peer", "--mode", "diloco", "--json"]
    argv += ["--run-dir", str(run_dir), "--data-dir", str(data_dir), "--swarm", swarm]
    argv += ["--layers", "1", "--width", "32", "--seq-len", "32", "--batch-size", "4"]
    argv += ["--local-steps", "5", "--window", "6", "--heartbeat", "1"]
    argv += ["--report-every", "5", "--steps", "100000"]
    return argv + list(extra)


def write_tiny_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        lines = [f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(50)]
        (folder / f"m{i}.py").write_text("".join(lines))
    return folder


def ok_round(min_contributors: int, after: int = -1) -> Any:
    """Matches a successful ``round`` event with enough contributors, after round ``after``."""
    return lambda e: (
        e.get("event") == "round"
        and e["ok"]
        and e["contributors"] >= min_contributors
        and e["round"] > after
    )


class PeerEvents:
    """The JSON lines of a started peer process; its stderr went to ``err_path``."""

    def __init__(self, proc: subprocess.Popen[str], err_path: Path, name: str = "") -> None:
        self.proc = proc
        self.err_path = err_path
        self.name = name
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        # kept beside the stderr log: a failed run's events can be read afterwards
        with open(self.err_path.with_suffix(".jsonl"), "w") as kept:
            for line in self.proc.stdout:
                kept.write(line)
                kept.flush()
                try:
                    self.events.put(json.loads(line))
                except ValueError:
                    continue

    def wait_for(self, predicate: Any, timeout_s: float) -> dict[str, Any]:
        """The next event ``predicate`` accepts (earlier ones go to ``seen`` too)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self.events.get(timeout=min(left, 1.0))
            except queue.Empty:
                if self.proc.poll() is not None and self.events.empty():
                    break
                continue
            self.seen.append(event)
            if predicate(event):
                return event
        tail = self.err_path.read_text()[-2000:]
        raise AssertionError(f"{self.name}: no matching event; seen {self.seen[-5:]}; {tail}")

    def drain(self) -> None:
        """Move the events already read to ``seen`` (a later ``wait_for`` sees newer ones)."""
        while not self.events.empty():
            self.seen.append(self.events.get_nowait())

    def agreed_rounds(self, *others: PeerEvents, contributors: int) -> dict[int, list[str]]:
        """Round -> parameter fingerprints reported by this peer and ``others`` for
        successful rounds with ``contributors`` contributors."""
        by_round: dict[int, list[str]] = {}
        for peer in (self, *others):
            for e in peer.seen:
                if e.get("event") == "round" and e["ok"] and e["contributors"] == contributors:
                    by_round.setdefault(e["round"], []).append(e["fingerprint"])
        return by_round

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
