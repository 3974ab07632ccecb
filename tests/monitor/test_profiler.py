import threading

import pytest

from shoal.monitor.config import ProfilerConfig
from shoal.monitor.profiler import Phase, StepProfiler
from shoal.monitor.stats import RateMeter, percentile
from shoal.monitor.traffic import TrafficCounters, TrafficSnapshot, traffic_delta

from .fakes import FakeClock


def test_phases_accumulate_exclusively_with_fake_clock():
    clock = FakeClock(100.0)
    prof = StepProfiler(clock=clock)
    prof.begin_step(7)
    with prof.compute:
        clock.advance(0.5)
        with prof.communication:  # pauses compute
            clock.advance(0.2)
            with prof.waiting:
                clock.advance(0.1)
            clock.advance(0.05)
        clock.advance(0.25)
    clock.advance(0.3)  # outside any phase
    p = prof.end_step()
    assert p.step == 7
    assert p.compute_s == pytest.approx(0.75)
    assert p.communication_s == pytest.approx(0.25)
    assert p.waiting_s == pytest.approx(0.1)
    assert p.wall_s == pytest.approx(1.4)
    assert p.other_s == pytest.approx(0.3)


def test_open_phase_is_split_at_step_boundary_and_steps_chain():
    clock = FakeClock()
    prof = StepProfiler(clock=clock)
    prof.begin_step(0)
    with prof.phase("waiting"):
        clock.advance(1.0)
        first = prof.end_step()  # no begin_step: the next step starts here
        clock.advance(2.0)
    clock.advance(0.5)
    second = prof.end_step()
    assert (first.step, first.waiting_s, first.wall_s) == (0, 1.0, 1.0)
    assert (second.step, second.waiting_s, second.wall_s) == (1, 2.0, 2.5)


def test_time_added_from_another_thread_counts_in_current_step():
    clock = FakeClock()
    prof = StepProfiler(clock=clock)
    prof.begin_step(0)
    worker = threading.Thread(target=lambda: prof.add(Phase.COMMUNICATION, 0.4))
    worker.start()
    worker.join(5)
    clock.advance(1.0)
    p = prof.end_step()
    assert p.communication_s == pytest.approx(0.4)
    assert p.other_s == pytest.approx(0.6)
    assert prof.end_step().communication_s == 0.0


def _snap(peers, services):
    return TrafficSnapshot(peers=dict(peers), services=dict(services))


def test_traffic_delta_per_step_and_rolling_summary():
    clock = FakeClock()
    state = {"snap": _snap({}, {})}
    prof = StepProfiler(ProfilerConfig(window_steps=4), clock=clock, traffic=lambda: state["snap"])
    for step in range(6):
        prof.begin_step(step)
        with prof.compute:
            clock.advance(1.0 + step)  # compute 1..6 s
        with prof.communication:
            clock.advance(1.0)
        n = step + 1
        state["snap"] = _snap(
            {"peerA": TrafficCounters(n * 1000, n * 500, n, n), "peerB": TrafficCounters(10 * n)},
            {"averaging": TrafficCounters(n * 1000, n * 500, n, n), "dht": TrafficCounters(10 * n)},
        )
        profile = prof.end_step()
        assert profile.traffic.services["averaging"].bytes_sent == 1000
        assert profile.traffic.peers["peerB"].bytes_sent == 10
    summary = prof.summary()
    assert summary is not None and summary.steps == 4  # window of 4: steps 2..5
    compute = summary.phases["compute"]
    assert compute.total_s == pytest.approx(3 + 4 + 5 + 6)
    assert compute.p50_s == pytest.approx(4.5)
    assert compute.p90_s == pytest.approx(5.7)
    assert compute.fraction == pytest.approx(18 / 22)
    assert summary.fractions()["communication"] == pytest.approx(4 / 22)
    assert summary.bytes_by_service["averaging"].bytes_sent == 4000
    assert summary.bytes_by_service["dht"].bytes_sent == 40
    assert summary.bytes_by_peer["peerA"].bytes_received == 2000
    assert summary.to_dict()["bytes_by_peer"]["peerB"] == {"sent": 40, "received": 0}


def test_summary_is_none_before_first_step():
    assert StepProfiler(clock=FakeClock()).summary() is None


def test_traffic_delta_treats_a_shrinking_counter_as_reset():
    before = _snap({"p": TrafficCounters(100, 100, 5, 5)}, {"s": TrafficCounters(100, 100, 5, 5)})
    after = _snap(
        {"p": TrafficCounters(30, 150, 1, 6), "q": TrafficCounters()},
        {"s": TrafficCounters(130, 150, 6, 6)},
    )
    delta = traffic_delta(before, after)
    assert delta.peers == {"p": TrafficCounters(30, 50, 1, 1)}
    assert delta.services == {"s": TrafficCounters(30, 50, 1, 1)}
    assert after.total() == TrafficCounters(130, 150, 6, 6)


def test_percentile_interpolates_and_rejects_bad_input():
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile([0.0, 10.0], 90) == 9.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_rate_meter_window_reset_and_idleness():
    meter = RateMeter(window_s=10.0)
    assert meter.rate() == 0.0
    for t in range(0, 31):
        meter.observe(float(t), 5.0 * t if t < 20 else 100.0 + 2.0 * (t - 20))
    assert meter.rate(30.0) == pytest.approx(2.0)  # only the last 10 s count
    assert meter.rate(45.0) == 0.0  # nothing observed for longer than the window
    meter.observe(31.0, 1.0)  # counter reset
    assert meter.rate(31.0) == 0.0
