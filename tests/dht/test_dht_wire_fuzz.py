"""Every DHT handler fed malformed requests through a real server, with a valid session.

Each must answer OK or a clear refusal (``wire_fuzz.REFUSALS``): never an unmapped exception,
never a hang, never an allocation sized by the request; the node keeps serving afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from net.wire_fuzz import OK_OR_REFUSED, RawCaller, ServerCrashes, requests

from shoal.dht.peer import DHT
from shoal.net import Identity, NetConfig, NetRuntime
from shoal.net.proto.v1 import dht_pb2

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
CRASHES = ServerCrashes()
METHODS = {
    "Ping": dht_pb2.DHTPingRequest,
    "Store": dht_pb2.DHTStoreRequest,
    "FindNode": dht_pb2.DHTFindNodeRequest,
    "FindValue": dht_pb2.DHTFindValueRequest,
}


@pytest.fixture(scope="module")
def node() -> Iterator[tuple[NetRuntime, DHT, NetRuntime, DHT, RawCaller]]:
    server_rt = NetRuntime(Identity.generate(), NetConfig()).start()
    client_rt = NetRuntime(Identity.generate(), NetConfig()).start()
    server, client = DHT(server_rt), DHT(client_rt)
    try:
        with CRASHES:
            yield server_rt, server, client_rt, client, RawCaller(client_rt, server_rt.address)
    finally:
        client.close()
        server.close()
        client_rt.close()
        server_rt.close()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_handlers_refuse_malformed_requests(node, method: str) -> None:
    raw = node[4]

    @FUZZ
    @given(body=requests(METHODS[method]))
    def one(body: bytes) -> None:
        code = raw.call(f"/shoal.v1.DHT/{method}", "unary_unary", body)
        assert code in OK_OR_REFUSED, (method, code)
        assert CRASHES.messages == []

    one()


def test_node_still_serves_after_fuzzing_and_memory_stayed_bounded(node) -> None:
    server_rt, server, _, client, _ = node
    client.bootstrap([server_rt.address])
    assert client.store(b"after-fuzz", b"v", time.time() + 60) >= 1
    assert server.get(b"after-fuzz") == b"v"
    assert CRASHES.peak_growth_mib() < 512, CRASHES.peak_growth_mib()
