"""``shoal demo --json`` end to end: a local swarm trains, loses a peer to SIGKILL, gets it
back, and leaves no process behind."""

import json
import subprocess
import sys

import pytest

from shoal.testbed.procs import pid_alive

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_demo_json_summary(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "shoal.cli.main", "demo", "--json", "--run-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    summary = json.loads(lines[0])
    assert summary["loss_after"] < summary["loss_before"], summary
    assert summary["rejoined"] is True, summary
    assert isinstance(summary["recovered_s"], float | int) and summary["recovered_s"] > 0, summary
    assert summary["peers_alive"] == summary["peers"] == 4, summary
    assert 0 < summary["bytes_sent"] < summary["bytes_fp32_allreduce"], summary
    # peers announce their shaper, so the traffic between them crossed the shaped links
    assert summary["bytes_through_shapers"] > summary["bytes_sent"] // 2, summary
    # bootstrap, 4 peers, the restarted peer and the dashboard
    assert len(summary["pids"]) == 7, summary
    assert summary["leftover_pids"] == []
    assert [p for p in summary["pids"] if pid_alive(p)] == []
