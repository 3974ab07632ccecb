"""Training peers (``python -m shoal.train.recovery_peer``) killed with SIGKILL and restarted.

Every wait is on a JSON line the peer prints (or a file), with a deadline; nothing sleeps.
"""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from shoal.monitor.events import read_events
from shoal.state.checkpoint import list_checkpoints
from shoal.testbed.procs import spare_port

START_TIMEOUT_S = 150.0
STEP_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    for i in range(6):
        lines = [f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(50)]
        (folder / f"m{i}.py").write_text("".join(lines))
    return folder


class Peer:
    """One demo peer process; its stdout events arrive on a queue, stderr goes to a file."""

    def __init__(self, run_dir, data_dir, *, port=0, join=None, interval=10):
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.err_path = run_dir / f"peer-{time.monotonic_ns()}.err"
        args = ["--run-dir", str(run_dir), "--data-dir", str(data_dir), "--port", str(port)]
        args += ["--interval", str(interval), "--report-every", "2", "--swarm", "t"]
        if join:
            args += ["--join", join]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shoal.train.recovery_peer", *args],
            stdout=subprocess.PIPE,
            stderr=open(self.err_path, "w"),  # noqa: SIM115 - closed with the process
            text=True,
        )
        self.events: queue.Queue = queue.Queue()
        self.seen: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.events.put(json.loads(line))
        self.events.put(None)

    def wait_for(self, kind, timeout_s, where=lambda e: True):
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                event = self.events.get(timeout=max(0.01, left))
            except queue.Empty:
                event = {"event": "timeout"}
            if event is None or event["event"] == "timeout":
                raise AssertionError(
                    f"no {kind} event within {timeout_s} s; stderr:\n"
                    + self.err_path.read_text()[-3000:]
                )
            self.seen.append(event)
            if event["event"] == kind and where(event):
                return event

    def kill9(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _newest_steps(run_dir):
    return [int(p.name.split("-")[1]) for p in list_checkpoints(run_dir / "checkpoints")]


@pytest.mark.slow
def test_killed_peer_rejoins_and_a_whole_swarm_restart_continues(tmp_path, data_dir):
    port_a = spare_port()
    join = f"127.0.0.1:{port_a}"
    a = Peer(tmp_path / "a", data_dir, port=port_a)
    b = Peer(tmp_path / "b", data_dir, join=join)
    peers = [a, b]
    try:
        a.wait_for("listening", START_TIMEOUT_S)
        b.wait_for("checkpoint", START_TIMEOUT_S, lambda e: e["step"] >= 20)
        b.kill9()
        b_saved = max(_newest_steps(tmp_path / "b"))
        assert b_saved >= 20

        # restart B: A kept training and announcing, so B continues from A's fresher state
        b = Peer(tmp_path / "b", data_dir, join=join)
        peers.append(b)
        found = b.wait_for("recovered", START_TIMEOUT_S)
        assert found["local_step"] == b_saved
        assert found["source"] == "swarm" and found["swarm_step"] > b_saved, found
        assert found["step"] >= found["swarm_step"]  # the donor may have moved on since
        b.wait_for("step", STEP_TIMEOUT_S, lambda e: e["step"] >= found["step"] + 4)

        # the whole swarm dies and comes back: each continues from its last checkpoint
        a.wait_for("checkpoint", STEP_TIMEOUT_S, lambda e: e["step"] >= 20)
        a.kill9()
        b.kill9()
        saved = {p: max(_newest_steps(tmp_path / p)) for p in ("a", "b")}
        a = Peer(tmp_path / "a", data_dir, port=port_a)
        b = Peer(tmp_path / "b", data_dir, join=join)
        peers += [a, b]
        for name, peer in (("a", a), ("b", b)):
            found = peer.wait_for("recovered", START_TIMEOUT_S)
            assert found["step"] >= saved[name], (name, found, saved)
            peer.wait_for("step", STEP_TIMEOUT_S, lambda e, s=found["step"]: e["step"] > s)
    finally:
        for p in peers:
            p.stop()


@pytest.mark.slow
def test_truncated_newest_checkpoint_is_skipped_with_a_clear_line(tmp_path, data_dir):
    c = Peer(tmp_path / "c", data_dir, interval=5)
    peers = [c]
    try:
        c.wait_for("checkpoint", START_TIMEOUT_S, lambda e: e["step"] >= 10)
        c.kill9()
        folders = list_checkpoints(tmp_path / "c" / "checkpoints")
        assert len(folders) >= 2
        newest, previous = folders[-1], folders[-2]
        target = newest / "model.safetensors"
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])

        c = Peer(tmp_path / "c", data_dir, interval=5)
        peers.append(c)
        found = c.wait_for("recovered", START_TIMEOUT_S)
        assert found["source"] == "disk"
        assert found["step"] == int(previous.name.split("-")[1])
        log = c.err_path.read_text()
        assert f"skipping checkpoint {newest.name}: checkpoint file {target} is truncated" in log
        c.wait_for("step", STEP_TIMEOUT_S, lambda e: e["step"] > found["step"])
        events = list(read_events([tmp_path / "c" / "events.jsonl"]))
        recoveries = [e.fields for e in events if e.kind == "recovery"]
        assert [r["source"] for r in recoveries] == ["none", "disk"]
        assert recoveries[-1]["step"] == found["step"]
        assert any(e.kind == "checkpoint" and e.fields["step"] >= 10 for e in events)
    finally:
        for p in peers:
            p.stop()
