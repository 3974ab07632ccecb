"""`shoal monitor --events`: a real process serving the dashboard for a local peer's log."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import pytest

from shoal.cli.main import main
from shoal.monitor.config import EventLogConfig, MonitorConfig
from shoal.monitor.peer import PeerMonitor

from .fakes import FakeClock


@pytest.mark.slow
def test_cli_serves_event_log_and_stops_on_sigint(tmp_path):
    log = tmp_path / "peer.jsonl"
    clock = FakeClock(2_000_000_000.0)  # in the future: the peer stays fresh during the test
    monitor = PeerMonitor(
        MonitorConfig(events=EventLogConfig(path=log)), peer="shcli", wall_clock=clock
    )
    monitor.start()
    for step in range(1, 6):
        clock.advance(5)
        monitor.record_progress(step, loss=5.0 / step, samples=16)
        monitor.snapshot()
    monitor.record_failure("allreduce", error="timeout")
    monitor.close()

    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli.main", "monitor", "--events", str(log), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read()
        with urllib.request.urlopen(url + "api/state", timeout=10) as response:
            state = json.load(response)
        assert state["source"] == "events: peer.jsonl"
        assert [p[1] for p in state["series"]["loss"]["shcli"]] == [1, 2, 3, 4, 5]
        assert {e["kind"] for e in state["events"]} >= {"start", "failure", "stop"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_cli_refuses_bad_arguments(tmp_path, capsys):
    assert main(["monitor"]) == 2
    assert "exactly one source" in capsys.readouterr().err
    assert main(["monitor", "--events", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["monitor", "--events", "x", "--join", "127.0.0.1:1"]) == 2
    assert "exactly one source" in capsys.readouterr().err


def _start_peers(n: int):
    """``n`` peers on loopback, each with a served DHT node and a monitor that published
    its summary once."""
    from shoal.dht.peer import DHT
    from shoal.monitor.config import SwarmViewConfig
    from shoal.monitor.publish import DhtSummaryStore, SummaryPublisher
    from shoal.monitor.traffic import net_traffic_provider
    from shoal.net.config import NetConfig
    from shoal.net.identity import Identity
    from shoal.net.runtime import NetRuntime

    view = SwarmViewConfig()
    peers = []
    for i in range(n):
        runtime = NetRuntime(Identity.generate(), NetConfig(port=0, unix_socket=False)).start()
        dht = DHT(runtime)
        peers.append((runtime, dht))
        if i:
            dht.bootstrap([peers[0][0].address])
        # The wiring a peer uses (see src/shoal/monitor/README.md).
        monitor = PeerMonitor(
            MonitorConfig(),
            peer=str(runtime.peer_id),
            traffic=net_traffic_provider(runtime.traffic),
        )
        monitor.set_role("trainer")
        monitor.record_progress(100 + i, loss=2.0 + i, samples=10)
        store = DhtSummaryStore(dht.node, config=view)
        publisher = SummaryPublisher(monitor.snapshot, store.publish, view)
        assert runtime.run(publisher.publish_once(), timeout_s=15)
        monitor.close()
    return peers


@pytest.mark.slow
def test_cli_join_observes_summaries_published_in_the_dht():
    peers = _start_peers(3)
    proc = None
    try:
        cmd = [sys.executable, "-m", "shoal.cli.main", "monitor", "--port", "0"]
        cmd += ["--join", peers[1][0].address, "--poll-interval", "0.2"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read()
        with urllib.request.urlopen(url + "api/state", timeout=10) as response:
            state = json.load(response)
        assert state["source"] == f"swarm via {peers[1][0].address}"
        rows = {p["peer"]: p for p in state["peers"]}
        assert sorted(rows) == sorted(str(r.peer_id) for r, _ in peers)
        assert sorted(p["step"] for p in rows.values()) == [100, 101, 102]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for runtime, dht in peers:
            dht.close()
            runtime.close()
