from dataclasses import replace

import pytest

from shoal.errors import ConfigError
from shoal.monitor.alerts import compute_alerts
from shoal.monitor.config import AlertConfig, SwarmViewConfig
from shoal.monitor.summary import PeerSummary
from shoal.monitor.view import SwarmView, build_view

from .fakes import NOW, peer_id, swarm_history

CFG = AlertConfig(stall_after_s=60, straggler_ratio=0.5, low_bandwidth_bps=1e6)


def trainer(i: int, sps: float = 40.0, **kw) -> PeerSummary:
    fields = dict(peer=peer_id(i), t=NOW, step=100, step_t=NOW - 5, samples_per_s=sps)
    fields.update(kw)
    return PeerSummary(**fields)


def view(*peers: PeerSummary) -> SwarmView:
    return SwarmView(now=NOW, peers=tuple(peers))


def kinds(alerts) -> list[str]:
    return [a.kind for a in alerts]


def test_healthy_swarm_has_no_alerts():
    v = view(*(trainer(i, up_bps=50e6, down_bps=50e6) for i in range(4)))
    assert compute_alerts(v, NOW, CFG) == []
    assert compute_alerts(view(), NOW, CFG) == []


def test_stall_is_judged_from_the_latest_step_progress_of_any_peer():
    v = view(trainer(0, step_t=NOW - 100), trainer(1, step_t=NOW - 61))
    [alert] = compute_alerts(v, NOW, CFG)
    assert (alert.kind, alert.severity) == ("stalled", "critical")
    assert "61 s" in alert.message
    assert compute_alerts(v, NOW - 2, CFG) == []  # one second earlier it was still fine


def test_straggler_is_named_relative_to_the_median():
    v = view(trainer(0, 40), trainer(1, 42), trainer(2, 19.9), trainer(3, 44))  # median 41
    alerts = compute_alerts(v, NOW, CFG)
    assert kinds(alerts) == ["straggler"]
    assert alerts[0].peer == peer_id(2)
    # Too few peers to judge, and servers are not trainers.
    assert compute_alerts(view(trainer(0, 40), trainer(1, 1)), NOW, CFG) == []
    servers = view(*(trainer(i, 40 if i else 1, role="stage_server") for i in range(4)))
    assert "straggler" not in kinds(compute_alerts(servers, NOW, CFG))


def _stages(*caps_demands: tuple[float, float | None]) -> SwarmView:
    peers = [
        trainer(10 + s, cap, role="stage_server", stage=s, demand_per_s=dem)
        for s, (cap, dem) in enumerate(caps_demands)
    ]
    return view(*peers)


def test_bottleneck_stage_by_demand_or_by_relative_capacity():
    [a] = compute_alerts(_stages((60, 40), (20, 45), (50, 40)), NOW, CFG)
    assert (a.kind, a.stage) == ("bottleneck", 1)
    # No demand reported: the stage far below the median capacity.
    [b] = compute_alerts(_stages((60, None), (62, None), (10, None)), NOW, CFG)
    assert (b.kind, b.stage) == ("bottleneck", 2)
    # Balanced stages, or a single stage: nothing to report.
    assert compute_alerts(_stages((60, 50), (55, 50), (58, 50)), NOW, CFG) == []
    assert compute_alerts(_stages((5, 50)), NOW, CFG) == []


def test_low_bandwidth_uses_the_slowest_measured_direction():
    v = view(trainer(0, up_bps=0.5e6, down_bps=50e6), trainer(1, up_bps=None, down_bps=None))
    [a] = compute_alerts(v, NOW, CFG)
    assert (a.kind, a.peer) == ("low_bandwidth", peer_id(0))
    assert "500.0 kbit/s" in a.message


def test_critical_alerts_come_first():
    old = NOW - 100
    v = view(
        trainer(0, 40, step_t=old),
        trainer(1, 40, step_t=old),
        trainer(2, 1, step_t=old, up_bps=1.0),
    )
    assert kinds(compute_alerts(v, NOW, CFG)) == ["stalled", "straggler", "low_bandwidth"]


def test_fake_swarm_view_alerts():
    v = build_view(swarm_history(), NOW + 1, SwarmViewConfig())
    alerts = compute_alerts(v, NOW + 1, CFG)
    assert sorted(kinds(alerts)) == ["bottleneck", "low_bandwidth", "straggler"]


def test_view_keeps_newest_per_peer_and_splits_stale_and_future():
    cfg = SwarmViewConfig(stale_after_s=30, max_future_s=5)
    a_old, a_new = trainer(0, t=NOW - 20, step=1), trainer(0, t=NOW - 10, step=2)
    b_stale = trainer(1, t=NOW - 31)
    c_future = trainer(2, t=NOW + 6)
    d_skewed = trainer(3, t=NOW + 4)
    v = build_view([a_new, a_old, b_stale, c_future, d_skewed], NOW, cfg)
    assert [s.peer for s in v.peers] == [peer_id(0), peer_id(3)]
    assert v.by_peer()[peer_id(0)].step == 2
    assert [s.peer for s in v.stale] == [peer_id(1)]
    assert v.total_samples_per_s() == 80.0
    assert replace(v, peers=()).max_step() == 0


def test_alert_config_is_checked():
    with pytest.raises(ConfigError, match="straggler_ratio"):
        AlertConfig(straggler_ratio=1.5)
    with pytest.raises(ConfigError, match="stall_after_s"):
        AlertConfig(stall_after_s=0)
