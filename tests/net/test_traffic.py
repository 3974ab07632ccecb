"""Traffic accounting: counters, histograms, bounded peer tracking."""

from __future__ import annotations

from shoal.net.proto.v1 import peer_pb2, peer_pb2_grpc
from shoal.net.traffic import BUCKETS_S, OTHER_PEER, Histogram, Traffic, service_of


def test_histogram_quantiles():
    h = Histogram()
    assert h.quantile(0.5) is None
    for _ in range(90):
        h.observe(100e-6)
    for _ in range(10):
        h.observe(1.0)
    assert h.quantile(0.5) == 100e-6  # a bucket bound, exact for this value
    assert h.quantile(0.99) >= 1.0
    h.observe(1e6)
    assert h.counts[-1] == 1 and h.quantile(1.0) == BUCKETS_S[-1]


def test_counters_and_peer_cap():
    t = Traffic(max_peers=2)
    t.sent("p1", "/shoal.v1.Peer/Ping", 10)
    t.received("p1", "/shoal.v1.DHT/Find", 7)
    t.sent("p2", "/shoal.v1.Peer/Ping", 1)
    t.sent("p3", "/shoal.v1.Peer/Ping", 1)
    snap = t.snapshot()
    assert snap["peers"]["p1"] == {
        "bytes_in": 7,
        "bytes_out": 10,
        "messages_in": 1,
        "messages_out": 1,
    }
    assert set(snap["peers"]) == {"p1", "p2", OTHER_PEER}
    assert snap["services"]["shoal.v1.Peer"]["bytes_out"] == 12
    assert service_of("/shoal.v1.DHT/Find") == "shoal.v1.DHT"


def test_runtime_counts_both_sides(make_runtime):
    a, b = make_runtime(), make_runtime()
    stub = a.stub(peer_pb2_grpc.PeerStub, b.address)
    for _ in range(5):
        a.run(stub.Ping(peer_pb2.PingRequest(payload=b"x" * 100)), 5)
    sent = a.traffic.snapshot()
    got = b.traffic.snapshot()
    a_out = sent["peers"][b.peer_id.to_string()]
    b_in = got["peers"][a.peer_id.to_string()]
    assert a_out["messages_out"] >= 5 and a_out["bytes_out"] >= 500
    assert b_in["bytes_in"] == a_out["bytes_out"]  # both sides count the same payload bytes
    assert sent["latency"]["client:/shoal.v1.Peer/Ping"]["count"] == 5
    assert got["latency"]["server:/shoal.v1.Peer/Ping"]["count"] == 5
