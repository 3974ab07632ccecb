"""The demo's pure pieces: event folding, the fp32 baseline, config checks, process
supervision of a child that ignores SIGTERM."""

import sys
import time

import pytest

from shoal.cli._demo_procs import Children
from shoal.cli._demo_state import DemoConfig, SwarmState, fp32_allreduce_bytes
from shoal.errors import ConfigError
from shoal.testbed.procs import pid_alive


def test_fold_kill_and_restart_keeps_bytes_and_times_the_first_round():
    s = SwarmState()
    s.apply("peer0", {"event": "listening", "address": "127.0.0.1:1"}, 0.0)
    s.apply("peer0", {"event": "ready", "step": 0}, 1.0)
    s.apply("peer0", {"event": "round", "ok": True, "round": 0, "step": 20, "bytes_sent": 100}, 5.0)
    row = s.row("peer0")
    assert (row.status, row.rounds_ok, row.round_index, row.first_round_s) == (
        "training",
        1,
        1,
        5.0,
    )
    s.restart("peer0", 1, 10.0)
    assert row.first_round_s is None and row.bytes_earlier == 100 and row.bytes_sent == 0
    s.apply("peer0", {"event": "recovered", "source": "swarm", "step": 40}, 12.0)
    s.apply("peer0", {"event": "round", "ok": False, "reason": "alone", "step": 60}, 14.0)
    assert row.first_round_s is None and "alone" in row.note
    s.apply("peer0", {"event": "round", "ok": True, "round": 3, "step": 80, "bytes_sent": 50}, 20.0)
    assert row.first_round_s == 20.0 and row.recovered_from == "swarm"
    s.apply("peer0", {"event": "stopped", "step": 100, "val_bpb": 3.5, "bytes_sent": 70}, 30.0)
    assert s.total_bytes() == 170 and s.total_steps() == 100 and s.final_bpb() == 3.5


def test_fp32_allreduce_bytes():
    assert fp32_allreduce_bytes(1000, 4, 10) == int(10 * 1.5 * 4000)
    assert fp32_allreduce_bytes(1000, 1, 10) == 0


@pytest.mark.parametrize(
    "kwargs", [{"peers": 1}, {"kill_peer": 4}, {"steps": 5}, {"mode": "x"}, {"delay_ms": -1}]
)
def test_config_rejects(kwargs):
    with pytest.raises(ConfigError):
        DemoConfig(**kwargs)


def test_children_close_kills_a_child_that_ignores_sigterm(tmp_path):
    code = "import signal,sys,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    kids = Children(tmp_path, term_timeout_s=0.5)
    kids.start("stubborn", [sys.executable, "-c", code])
    line = kids.lines.get(timeout=30)
    assert (line.name, line.text) == ("stubborn", "up")
    pid = kids.pid("stubborn")
    t0 = time.monotonic()
    kids.close()
    assert time.monotonic() - t0 < 5
    assert not pid_alive(pid)
    kids.close()  # idempotent
    with pytest.raises(RuntimeError):
        kids.start("late", [sys.executable, "-c", "pass"])


def test_the_default_deadline_grows_with_the_rounds_a_run_has():
    from shoal.cli._demo_state import default_deadline_s

    assert default_deadline_s("diloco", 100, 10) == 170.0  # the default run: 10 rounds
    assert default_deadline_s("streaming", 150, 10) == 180.0
    # sync averages at every step: 100 rounds, about 1.5 s each on the demo's links
    assert default_deadline_s("sync", 100, 10) == 350.0
    assert default_deadline_s("diloco", 5, 10) == 170.0
