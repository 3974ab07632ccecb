import re
import urllib.request

import pytest

from shoal.errors import ConfigError
from shoal.monitor.config import MetricsConfig
from shoal.monitor.metrics import PeerMetrics
from shoal.monitor.traffic import TrafficCounters, TrafficSnapshot, net_traffic_provider
from shoal.net.traffic import Traffic


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert match, f"{sample} not in exposition"
    return float(match.group(1))


def test_two_peers_in_one_process_serve_their_own_registries():
    counters = TrafficCounters(1000, 2000, 3, 4)
    traffic = {"now": TrafficSnapshot({"shB": counters}, {"averaging": counters})}
    a = PeerMetrics(MetricsConfig(port=0), traffic=lambda: traffic["now"])
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
        more = TrafficCounters(5000, 2000, 4, 4)
        traffic["now"] = TrafficSnapshot({"shB": more}, {"averaging": more})  # read at scrape
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
    peers = {f"sh{i:03d}": TrafficCounters(i + 1, 0, 0, 0) for i in range(10)}
    snap = TrafficSnapshot(peers=peers)
    m = PeerMetrics(MetricsConfig(port=None, max_peer_labels=3), traffic=lambda: snap)
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


def test_transport_accounting_is_exported_through_the_adapter():
    traffic = Traffic()
    traffic.sent("shB", "/shoal.v1.DHT/FindValue", 300)
    traffic.received("shB", "/shoal.v1.DHT/FindValue", 1200)
    traffic.sent("shC", "/shoal.v1.Averaging/Reduce", 5000)
    for seconds in (0.001, 0.002, 0.5):
        traffic.latency("/shoal.v1.DHT/FindValue", seconds)
    provider = net_traffic_provider(traffic)
    snap = provider()
    assert snap.services["shoal.v1.DHT"] == TrafficCounters(300, 1200, 1, 1)
    assert snap.total().bytes_sent == 5300
    text = PeerMetrics(MetricsConfig(), traffic=provider).exposition().decode()
    assert value(text, 'shoal_service_bytes_received_total{service="shoal.v1.DHT"}') == 1200
    assert value(text, 'shoal_peer_messages_sent_total{peer="shC"}') == 1
    method = 'method="/shoal.v1.DHT/FindValue",side="client"'
    assert value(text, f"shoal_rpc_latency_seconds_count{{{method}}}") == 3
    assert value(text, f"shoal_rpc_latency_seconds_sum{{{method}}}") == pytest.approx(0.503)
    le = re.findall(
        r'shoal_rpc_latency_seconds_bucket\{le="([^"]+)",' + re.escape(method) + r"\} (\S+)", text
    )
    cumulative = [float(v) for _, v in le]
    assert cumulative == sorted(cumulative) and cumulative[-1] == 3 and le[-1][0] == "+Inf"
    at_4ms = [float(v) for b, v in le if b != "+Inf" and 0.0025 < float(b) <= 0.0064]
    assert at_4ms and at_4ms[0] == 2
