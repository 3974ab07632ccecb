import asyncio
import re

import pytest

from shoal.monitor.config import EventLogConfig, MetricsConfig, MonitorConfig, ProfilerConfig
from shoal.monitor.events import read_events
from shoal.monitor.peer import PeerMonitor
from shoal.monitor.sources import EventLogSource
from shoal.monitor.traffic import TrafficCounters, TrafficSnapshot

from .fakes import FakeClock


def make(tmp_path, traffic=None):
    wall, mono = FakeClock(1_000.0), FakeClock(0.0)
    config = MonitorConfig(
        metrics=MetricsConfig(port=None),
        events=EventLogConfig(path=tmp_path / "peer.jsonl"),
        profiler=ProfilerConfig(window_steps=10, rate_window_s=30.0),
    )
    monitor = PeerMonitor(config, peer="shme", traffic=traffic, wall_clock=wall, clock=mono)
    return monitor, wall, mono


def test_steps_feed_metrics_profile_and_summary(tmp_path):
    totals = {"now": TrafficSnapshot()}
    monitor, wall, mono = make(tmp_path, traffic=lambda: totals["now"])
    monitor.start()
    monitor.set_role("trainer")
    monitor.set_reachability("punched")
    monitor.set_bandwidth(20e6, 100e6)
    monitor.summary()  # first traffic observation
    for step in range(5):
        monitor.begin_step(step)
        with monitor.profiler.compute:
            mono.advance(0.6)
        with monitor.profiler.communication:
            mono.advance(0.3)
        with monitor.profiler.waiting:
            mono.advance(0.1)
        wall.advance(1.0)
        sent = TrafficCounters((step + 1) * 1000, 0, 1, 0)
        totals["now"] = TrafficSnapshot({"shpeer": sent}, {"averaging": sent})
        monitor.end_step(loss=3.0 - step * 0.1, samples=8, tokens=8 * 128)
    monitor.record_validation(5, 1.75)
    s = monitor.summary()
    assert (s.peer, s.step, s.step_t, s.role, s.reachability) == (
        "shme",
        5,
        1005.0,
        "trainer",
        "punched",
    )
    assert s.loss == 2.6 and s.val_bpb == 1.75
    assert s.samples_per_s == 8.0 and s.tokens_per_s == 8 * 128
    assert (s.compute_frac, s.comm_frac, s.wait_frac) == pytest.approx((0.6, 0.3, 0.1))
    assert s.tx_bps == 8 * 1000.0 and s.up_bps == 20e6
    text = monitor.metrics.exposition().decode()
    assert re.search(r"^shoal_step 5\.0$", text, re.M)
    assert re.search(r'^shoal_phase_seconds_total\{phase="compute"\} 3\.0', text, re.M)
    monitor.close()
    monitor.close()


def test_events_reach_log_and_counters(tmp_path):
    monitor, _, _ = make(tmp_path)
    monitor.start()
    monitor.record_join("shyou")
    monitor.record_round("allreduce", 2.0, group_size=3)
    monitor.record_failure("allreduce", error="timeout")
    monitor.record_retry("allreduce", attempt=1)
    monitor.record_checkpoint(40, path="ckpt/40")
    monitor.set_role("stage_server", stage=2)
    monitor.set_role("stage_server", stage=2)  # unchanged: no event
    monitor.record_leave("shyou")
    s = monitor.summary()
    assert (s.rounds, s.failures, s.stage) == (1, 1, 2)
    text = monitor.metrics.exposition().decode()
    assert 'shoal_failures_total{kind="allreduce"} 1.0' in text
    assert "shoal_checkpoint_step 40.0" in text
    monitor.close()
    kinds = [e.kind for e in read_events([tmp_path / "peer.jsonl"])]
    assert kinds == [
        "start",
        "join",
        "round",
        "failure",
        "retry",
        "checkpoint",
        "stage_change",
        "leave",
        "stop",
    ]


def test_snapshots_in_the_log_feed_the_dashboard_source(tmp_path):
    monitor, wall, _ = make(tmp_path)
    for step in range(3):
        monitor.record_progress(step + 1, loss=4.0 - step, samples=4)
        wall.advance(10.0)
        monitor.snapshot()
    monitor.record_failure("rpc")
    source = EventLogSource([tmp_path / "peer.jsonl"])
    batch = asyncio.run(source.poll())
    assert [s.step for s in batch.summaries] == [1, 2, 3]
    assert [s.loss for s in batch.summaries] == [4.0, 3.0, 2.0]
    assert [e.kind for e in batch.events] == ["failure"]
    monitor.snapshot()
    assert [s.step for s in asyncio.run(source.poll()).summaries] == [3]
    monitor.close()


def test_membership_changes_become_join_and_leave_events(tmp_path):
    monitor, _, _ = make(tmp_path)
    assert monitor.observe_members(["a", "b"]) == ([], [])
    assert monitor.observe_members(["b", "c", "d"]) == (["c", "d"], ["a"])
    assert monitor.observe_members(["d", "c", "b"]) == ([], [])
    monitor.close()
    events = [(e.kind, e.fields["other"]) for e in read_events([tmp_path / "peer.jsonl"])]
    assert events == [("join", "c"), ("join", "d"), ("leave", "a")]
    assert "shoal_swarm_peers 3.0" in monitor.metrics.exposition().decode()


def test_publisher_without_a_store_still_logs_summaries(tmp_path):
    from shoal.monitor.config import SwarmViewConfig
    from shoal.monitor.publish import SummaryPublisher

    monitor, _, _ = make(tmp_path)
    monitor.record_progress(3, loss=1.5)
    publisher = SummaryPublisher(monitor.snapshot, None, SwarmViewConfig())
    assert asyncio.run(publisher.publish_once())
    monitor.close()
    [summary] = [e for e in read_events([tmp_path / "peer.jsonl"]) if e.kind == "summary"]
    assert summary.fields["step"] == 3 and summary.fields["loss"] == 1.5
