"""``shoal peer`` behind a symmetric NAT trains with public peers (the session ``bed``).

relay and server2 run public DiLoCo peers; c sits behind home3's symmetric NAT and joins
with no flag: its dial-back check finds that nobody can reach it, so it averages in client
mode (it pulls its results) and still contributes to every round.
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

import pytest

from shoal.testbed import Testbed

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PORT = 7700
START_TIMEOUT_S = 150.0
ROUND_TIMEOUT_S = 120.0


class _Peer:
    """One ``shoal peer`` inside a testbed host; its JSON lines arrive on a queue."""

    def __init__(self, bed: Testbed, host: str, run_dir: Path, data: Path, join: str = "") -> None:
        self.name = host
        address = bed.hosts[host].address
        argv = [sys.executable, "-m", "shoal.cli.main", "peer", "--mode", "diloco", "--json"]
        argv += ["--run-dir", str(run_dir), "--data-dir", str(data), "--swarm", "nat-peers"]
        argv += ["--host", address, "--port", str(PORT)]
        argv += ["--layers", "1", "--width", "32", "--seq-len", "32", "--batch-size", "4"]
        argv += ["--local-steps", "5", "--window", "6", "--heartbeat", "1", "--steps", "100000"]
        argv += ["--join", join] if join else []
        self.err = run_dir.with_suffix(".err")
        self.proc = bed.hosts[host].popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=open(self.err, "w"),  # noqa: SIM115 - closed with the process
            text=True,
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                continue

    def wait_for(self, predicate: Any, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self.events.get(timeout=min(left, 1.0))
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.seen.append(event)
            if predicate(event):
                return event
        tail = self.err.read_text()[-2000:]
        raise AssertionError(f"{self.name}: no matching event; seen {self.seen[-5:]}; {tail}")


def _ok_round(contributors: int) -> Any:
    return lambda e: e.get("event") == "round" and e["ok"] and e["contributors"] >= contributors


def test_a_peer_behind_a_symmetric_nat_turns_client_and_trains(bed: Testbed, tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        lines = [f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(50)]
        (data / f"m{i}.py").write_text("".join(lines))
    first = f"{bed.hosts['relay'].address}:{PORT}"
    peers: list[_Peer] = []
    try:
        relay = _Peer(bed, "relay", tmp_path / "relay", data)
        peers.append(relay)
        relay.wait_for(lambda e: e.get("event") == "listening", START_TIMEOUT_S)
        server2 = _Peer(bed, "server2", tmp_path / "server2", data, join=first)
        natted = _Peer(bed, "c", tmp_path / "c", data, join=first)
        peers += [server2, natted]

        public = server2.wait_for(lambda e: e.get("event") == "reachability", START_TIMEOUT_S)
        assert public["reached"] == 1 and not public["client_mode"], public
        hidden = natted.wait_for(lambda e: e.get("event") == "reachability", START_TIMEOUT_S)
        assert hidden["unreached"] == 1 and hidden["client_mode"], hidden

        rounds = [p.wait_for(_ok_round(3), START_TIMEOUT_S + ROUND_TIMEOUT_S) for p in peers]
        last = max(r["round"] for r in rounds)
        for peer, first_ok in zip(peers, rounds, strict=True):
            if first_ok["round"] < last:
                peer.wait_for(
                    lambda e, r=last: _ok_round(3)(e) and e["round"] >= r, ROUND_TIMEOUT_S
                )
        by_round: dict[int, list[str]] = {}
        for peer in peers:
            for e in peer.seen:
                if _ok_round(3)(e):
                    by_round.setdefault(e["round"], []).append(e["fingerprint"])
        agreed = [r for r, fps in by_round.items() if len(fps) == 3 and len(set(fps)) == 1]
        assert agreed, f"no round where all three hold the same parameters: {by_round}"
        for peer in peers:
            peer.proc.terminate()
        for peer in peers:
            assert peer.wait_for(lambda e: e.get("event") == "stopped", 30.0)["step"] > 0
    finally:
        for peer in peers:
            if peer.proc.poll() is None:
                peer.proc.kill()
            peer.proc.wait(timeout=10)
