import re
import urllib.request

import pytest

from shoal.errors import ConfigError
from shoal.monitor.config import MetricsConfig
from shoal.monitor.metrics import PeerMetrics
from shoal.monitor.traffic import TrafficCounters


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert match, f"{sample} not in exposition"
    return float(match.group(1))


def test_two_peers_in_one_process_serve_their_own_registries():
    traffic = {("shB", "averaging"): TrafficCounters(1000, 2000, 3, 4)}
    a = PeerMetrics(MetricsConfig(port=0), traffic=lambda: traffic)
    b = PeerMetrics(MetricsConfig(port=0))
    try:
        port_a, port_b = a.serve(), b.serve()
        assert port_a and port_b and port_a != port_b
        assert a.serve() == port_a  # idempotent
        a.step.set(42)
        a.train_loss.set(2.5)
        a.round_seconds.labels("allreduce").observe(1.5)
        a.failures.labels("allreduce").inc()
        a.retries.labels("allreduce").inc(2)
        a.checkpoints.inc()
        b.step.set(7)
        text_a, text_b = scrape(port_a), scrape(port_b)
        assert value(text_a, "shoal_step") == 42
        assert value(text_b, "shoal_step") == 7
        assert value(text_a, "shoal_train_loss") == 2.5
        assert value(text_a, 'shoal_round_duration_seconds_count{kind="allreduce"}') == 1
        assert value(text_a, 'shoal_round_duration_seconds_bucket{kind="allreduce",le="2.5"}') == 1
        assert value(text_a, 'shoal_failures_total{kind="allreduce"}') == 1
        assert value(text_a, 'shoal_retries_total{kind="allreduce"}') == 2
        assert value(text_a, "shoal_checkpoints_total") == 1
        assert value(text_a, 'shoal_service_bytes_sent_total{service="averaging"}') == 1000
        assert value(text_a, 'shoal_peer_bytes_received_total{peer="shB"}') == 2000
        traffic[("shB", "averaging")] = TrafficCounters(5000, 2000, 4, 4)  # read at scrape time
        assert value(scrape(port_a), 'shoal_service_bytes_sent_total{service="averaging"}') == 5000
        assert "shoal_service_bytes" not in text_b
    finally:
        a.close()
        b.close()
    a.close()
    with pytest.raises(OSError):
        scrape(port_a)
    assert a.serve() is None  # closed stays closed


def test_peer_labels_are_capped():
    traffic = {(f"sh{i:03d}", "dht"): TrafficCounters(i + 1, 0, 0, 0) for i in range(10)}
    m = PeerMetrics(MetricsConfig(port=None, max_peer_labels=3), traffic=lambda: traffic)
    assert m.serve() is None and m.port is None
    text = m.exposition().decode()
    peers = re.findall(r'shoal_peer_bytes_sent_total\{peer="([^"]+)"\}', text)
    assert sorted(peers) == ["other", "sh007", "sh008", "sh009"]
    assert value(text, 'shoal_peer_bytes_sent_total{peer="other"}') == sum(range(1, 8))
    m.close()


def test_config_is_checked():
    with pytest.raises(ConfigError, match="port"):
        MetricsConfig(port=70000)
    with pytest.raises(ConfigError, match="max_peer_labels"):
        MetricsConfig(max_peer_labels=0)
