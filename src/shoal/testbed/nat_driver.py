"""``PeerProcess``: drive a ``nat_peer`` process through its stdin/stdout JSON lines.

Used by the network-namespace tests and ``bench/nat.py``: ``start`` waits (bounded) for the
ready line; ``call(op, **args)`` sends one command and waits for its one-line answer within
``timeout_s``; ``stop`` quits politely and kills after a grace period.
"""

from __future__ import annotations

import json
import selectors
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from shoal.errors import PeerTimeout, ProtocolViolation

__all__ = ["PeerProcess"]

Popen = Callable[..., "subprocess.Popen[str]"]


class PeerProcess:
    def __init__(self, name: str, popen: Popen, args: Sequence[str]) -> None:
        self.name = name
        self.proc = popen(
            [sys.executable, "-m", "shoal.testbed.nat_peer", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.id = ""
        self.address = ""

    def _line(self, timeout_s: float) -> dict[str, Any]:
        stdout = self.proc.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if not sel.select(left):
                    continue
                line = stdout.readline()
                if not line:
                    raise ProtocolViolation(f"peer {self.name} exited ({self.proc.poll()})")
                if line.startswith("{"):
                    answer: dict[str, Any] = json.loads(line)
                    return answer
        raise PeerTimeout(f"peer {self.name} did not answer within {timeout_s} s")

    def start(self, timeout_s: float = 60.0) -> PeerProcess:
        ready = self._line(timeout_s)
        if ready.get("event") != "ready":
            raise ProtocolViolation(f"peer {self.name}: unexpected first line {ready}")
        self.id, self.address = ready["id"], ready["address"]
        return self

    def call(self, op: str, timeout_s: float = 30.0, **args: Any) -> dict[str, Any]:
        """Run one command; the peer bounds it by ``timeout_s`` and we wait a little longer."""
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.write(json.dumps({"op": op, "deadline_s": timeout_s, **args}) + "\n")
        stdin.flush()
        return self._line(timeout_s + 5.0)

    def quit(self) -> None:
        """Ask the peer to close (no wait)."""
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.close()
            except OSError:
                pass

    def stop(self, grace_s: float = 5.0) -> None:
        """Quit, wait up to ``grace_s``, then kill."""
        self.quit()
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()

    @staticmethod
    def stop_all(peers: Iterable[PeerProcess], grace_s: float = 5.0) -> None:
        """Quit all at once, then wait for each (the grace period is shared)."""
        peers = list(peers)
        for peer in peers:
            peer.quit()
        deadline = time.monotonic() + grace_s
        for peer in peers:
            try:
                peer.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                peer.kill()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5.0)
