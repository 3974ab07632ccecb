"""Every State handler fed malformed requests through a real server, with a valid session.

Each must answer OK or a clear refusal (``wire_fuzz.REFUSALS``): never an unmapped exception,
never a hang, never an allocation sized by the request; the donor keeps serving.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from net.wire_fuzz import OK_OR_REFUSED, RawCaller, ServerCrashes, requests

from shoal.net import Identity, NetConfig, NetRuntime
from shoal.net.proto.v1 import state_pb2
from shoal.state.announce import Announcement, DonorChoice
from shoal.state.checkpoint import Snapshot
from shoal.state.snapshot import ServedSnapshot, prepare
from shoal.state.sync_client import SyncConfig, download
from shoal.state.sync_service import StateServer

MANIFEST = "/shoal.v1.State/Manifest"
FETCH = "/shoal.v1.State/Fetch"
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
CHUNK = 4096
SEEN: set[grpc.StatusCode | str] = set()
CRASHES = ServerCrashes()
SNAP = Snapshot(
    step=5,
    files={"model": {"w": torch.arange(5000.0).view(100, 50), "b": torch.zeros(0)}},
    file_meta={},
    meta={},
)


@pytest.fixture(scope="module")
def donor() -> Iterator[tuple[NetRuntime, NetRuntime, ServedSnapshot, RawCaller]]:
    served = prepare(SNAP, chunk_bytes=CHUNK)
    server_rt = NetRuntime(Identity.generate(), NetConfig()).start()
    client_rt = NetRuntime(Identity.generate(), NetConfig()).start()
    server = StateServer(server_rt, lambda: served)
    try:
        with CRASHES:
            yield server_rt, client_rt, served, RawCaller(client_rt, server_rt.address)
    finally:
        server.close()
        client_rt.close()
        server_rt.close()


def _segments(served: ServedSnapshot) -> st.SearchStrategy[state_pb2.Segment]:
    """Segments near the real bounds: off by a byte, past the end, reversed, huge."""
    n = len(served.views)
    offsets = st.one_of(
        st.sampled_from([0, 1, CHUNK - 1, CHUNK, 2**32, 2**64 - 1]),
        st.integers(0, 3).map(lambda k: k * CHUNK),
        st.sampled_from([v.nbytes for v in served.views]).flatmap(
            lambda end: st.sampled_from([end - 1, end, end + 1])
        ),
    )
    return st.builds(
        state_pb2.Segment,
        tensor=st.sampled_from([0, n - 1, n, 2**32 - 1]),
        start=offsets.filter(lambda v: v >= 0),
        end=offsets.filter(lambda v: v >= 0),
    )


@FUZZ
@given(body=requests(state_pb2.ManifestRequest))
def test_manifest_refuses_malformed_requests(donor, body: bytes) -> None:
    code = donor[3].call(MANIFEST, "unary_unary", body)
    SEEN.add(code)
    assert code in OK_OR_REFUSED
    assert CRASHES.messages == []


@FUZZ
@given(data=st.data(), real_version=st.booleans())
def test_fetch_refuses_malformed_requests(donor, data, real_version: bool) -> None:
    _, _, served, raw = donor
    if real_version:  # reach the segment checks: the version is one the donor holds
        segments = data.draw(st.lists(_segments(served), max_size=4) | st.just([]))
        segments = segments or [state_pb2.Segment()] * 5000  # many (refused past the cap)
        body = state_pb2.FetchRequest(
            version=served.manifest.version, segments=segments
        ).SerializeToString()
    else:
        body = data.draw(requests(state_pb2.FetchRequest))
    code = raw.call(FETCH, "unary_stream", body)
    SEEN.add(code)
    assert code in OK_OR_REFUSED
    assert CRASHES.messages == []


def test_donor_still_serves_after_fuzzing_and_memory_stayed_bounded(donor) -> None:
    server_rt, client_rt, served, _ = donor
    assert {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION} <= SEEN
    cfg = SyncConfig(piece_bytes=CHUNK, streams_per_donor=2, total_timeout_s=30)
    m = served.manifest
    choice = DonorChoice(
        m.step,
        m.version,
        [Announcement(server_rt.peer_id, m.step, m.version, server_rt.address, 0)],
        [],
    )
    got = client_rt.run(download(client_rt, choice, cfg), 40).snapshot
    assert torch.equal(got.files["model"]["w"], SNAP.files["model"]["w"])
    assert CRASHES.peak_growth_mib() < 512, CRASHES.peak_growth_mib()
