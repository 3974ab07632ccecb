"""Backoff arithmetic, failure scores and decaying bans (pure, fake clock)."""

from __future__ import annotations

import pytest

from shoal.errors import ConfigError
from shoal.net.config import HealthConfig, NetConfig, RetryPolicy
from shoal.net.health import PeerHealth
from shoal.net.retry import Backoff, backoff_s, may_retry


def test_backoff_grows_caps_and_jitters_within_bounds():
    policy = RetryPolicy(initial_s=0.1, max_s=1.0, factor=2.0, jitter=0.25, attempts=10)
    assert backoff_s(policy, 0, 0.5) == 0.0
    mids = [backoff_s(policy, n, 0.5) for n in range(1, 7)]
    assert mids == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert backoff_s(policy, 2, 0.0) == pytest.approx(0.15)
    assert backoff_s(policy, 2, 0.999) == pytest.approx(0.25, rel=1e-2)
    assert backoff_s(policy, 9, 0.999) <= 1.0


def test_may_retry_bounds_attempts_and_deadline():
    policy = RetryPolicy(attempts=3, deadline_s=2.0)
    assert may_retry(policy, 1, 0.0, 0.1)
    assert not may_retry(policy, 3, 0.0, 0.1)
    assert not may_retry(policy, 1, 1.95, 0.1)


def test_backoff_state_tracks_next_try():
    policy = RetryPolicy(initial_s=1.0, max_s=8.0, jitter=0.0)
    b = Backoff()
    assert b.wait_s(100.0) == 0.0
    assert b.failed(policy, 100.0, 0.5) == 1.0
    assert b.failed(policy, 101.0, 0.5) == 2.0
    assert b.wait_s(102.0) == pytest.approx(1.0)
    b.succeeded()
    assert b.wait_s(102.0) == 0.0 and b.failures == 0


def test_ban_after_threshold_doubles_and_decays():
    cfg = HealthConfig(
        ban_threshold=3, ban_base_s=10, ban_max_s=25, score_half_life_s=60, ban_memory_s=1000
    )
    h = PeerHealth(cfg)
    t = 0.0
    assert not h.failure("p", t) and not h.failure("p", t)
    assert h.failure("p", t)  # third strike
    assert h.is_banned("p", t + 9.9) and not h.is_banned("p", t + 10.1)
    for _ in range(3):
        h.failure("p", 20.0)
    assert h.banned_until("p", 20.0) == pytest.approx(40.0)  # doubled
    for _ in range(3):
        h.failure("p", 50.0)
    assert h.banned_until("p", 50.0) == pytest.approx(75.0)  # capped at 25
    for _ in range(3):
        h.failure("p", 5000.0)
    assert h.banned_until("p", 5000.0) == pytest.approx(5010.0)  # forgotten: base again
    assert not h.is_banned("q", 0.0)


def test_forgiving_a_peers_reach_lifts_its_address_bans_only():
    cfg = HealthConfig(ban_threshold=2, ban_base_s=10, ban_memory_s=1000)
    h = PeerHealth(cfg)
    for key in ("p@h:1", "p@h:2", "p", "q@h:1"):
        h.failure(key, 0.0)
        h.failure(key, 0.0)
    assert sorted(h.forgive_reach("p", 1.0)) == ["h:1", "h:2"]
    assert not h.is_banned("p@h:1", 1.0) and h.score("p@h:2", 1.0) == 0.0
    assert h.is_banned("p", 1.0) and h.is_banned("q@h:1", 1.0)  # answers; another peer
    h.failure("p@h:1", 2.0)
    assert h.failure("p@h:1", 2.0)
    assert h.banned_until("p@h:1", 2.0) == 22.0  # its second ban: the count was kept
    h.failure("p@h:2", 2.0)  # a score, no new ban: nothing to lift
    assert h.forgive_reach("p", 3.0) == ["h:1"] and h.score("p@h:2", 3.0) > 0
    assert h.forgive_reach("p", 4.0) == []  # once per ban: handshakes cannot keep lifting it


def test_score_decays_and_success_helps():
    h = PeerHealth(HealthConfig(ban_threshold=3, score_half_life_s=10))
    h.failure("p", 0.0)
    h.failure("p", 0.0)
    assert h.score("p", 10.0) == pytest.approx(1.0)
    assert not h.failure("p", 10.0)  # 1 + 1 < 3: spread-out failures never ban
    h.success("p", 10.0)
    assert h.score("p", 10.0) == pytest.approx(1.0)


def test_health_memory_is_bounded():
    h = PeerHealth(HealthConfig(), max_peers=10)
    for i in range(100):
        h.failure(f"p{i}", float(i))
    assert len(h._peers) <= 10


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"call_timeout_s": 0}, "call_timeout_s"),
        ({"port": 70000}, "port"),
        ({"chunk_bytes": 2 << 20}, "chunk_bytes"),
        ({"max_message_bytes": 1000}, "max_message_bytes"),
        ({"shutdown_grace_s": 5}, "shutdown_grace_s"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        NetConfig(**kwargs)
    with pytest.raises(ConfigError, match="jitter"):
        RetryPolicy(jitter=1.5)
