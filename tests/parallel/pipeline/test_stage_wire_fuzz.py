"""Every Stage handler fed malformed bytes through a real stage server, with a session.

``test_pipeline_fuzz`` sends well-formed tensors with wrong metadata through the trainer's
own client; here the frames themselves are malformed: garbage, truncated, edge-valued
fields, metadata of the wrong type, tensor headers with absurd sizes. Forward, Backward,
Parameters and Info must answer OK or a clear refusal, never let an exception escape,
never hang; the server applies nothing and still trains afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from net.wire_fuzz import HIDDEN, OK_OR_REFUSED, RawCaller, ServerCrashes, messages, requests
from pipeline_harness import Swarm, batches, tiny

from shoal.net.config import NetConfig
from shoal.net.proto.v1 import stage_pb2 as pb
from shoal.net.proto.v1 import tensor_pb2
from shoal.net.tensors import meta_frame
from shoal.parallel.pipeline import StageServerConfig, TrainerConfig

pytestmark = pytest.mark.timeout(180)
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
SEEN: set[grpc.StatusCode | str] = set()
CRASHES = ServerCrashes()


@pytest.fixture(scope="module")
def bed() -> Iterator[tuple[Swarm, RawCaller]]:
    swarm = Swarm(tiny(2), StageServerConfig(num_stages=2, accumulate=1, max_budget_s=30.0))
    try:
        with CRASHES:
            swarm.server(0)
            last = swarm.server(1)
            client, _ = swarm.peer(NetConfig(port=0, unix_socket=False))
            yield swarm, RawCaller(client, last.runtime.address)
    finally:
        swarm.close()


def _frames(request_cls: type) -> st.SearchStrategy[list[bytes]]:
    """A request stream: maybe a fuzzed request in a meta frame, then fuzzed frames."""
    meta = st.one_of(
        messages(request_cls).map(meta_frame),
        messages(pb.ParametersInfo).map(meta_frame),  # metadata of the wrong type
    ).map(lambda f: f.SerializeToString())
    rest = st.lists(requests(tensor_pb2.TensorFrame), max_size=4)
    return st.tuples(st.one_of(meta, requests(tensor_pb2.TensorFrame)), rest).map(
        lambda t: [t[0], *t[1]]
    )


@FUZZ
@given(data=st.data(), backward=st.booleans())
def test_forward_and_backward_refuse_malformed_frames(bed, data, backward: bool) -> None:
    swarm, raw = bed
    method, cls = ("Backward", pb.BackwardRequest) if backward else ("Forward", pb.ForwardRequest)
    frames = data.draw(_frames(cls))
    code = raw.call(f"/shoal.v1.Stage/{method}", "stream_stream", iter(frames))
    SEEN.add(code)
    assert code in OK_OR_REFUSED | {HIDDEN}
    assert CRASHES.messages == []
    core = swarm.servers[1].core
    assert core.ledger.counters.applied == 0


@FUZZ
@given(data=st.data(), info=st.booleans())
def test_parameters_and_info_refuse_malformed_requests(bed, data, info: bool) -> None:
    _, raw = bed
    if info:
        code = raw.call(
            "/shoal.v1.Stage/Info", "unary_unary", data.draw(requests(pb.StageInfoRequest))
        )
    else:
        body = data.draw(requests(pb.ParametersRequest))
        code = raw.call("/shoal.v1.Stage/Parameters", "unary_stream", body, max_responses=2)
    SEEN.add(code)
    assert code in OK_OR_REFUSED
    assert CRASHES.messages == []


def test_stage_still_trains_after_fuzzing(bed) -> None:
    swarm, _ = bed
    assert grpc.StatusCode.INVALID_ARGUMENT in SEEN and grpc.StatusCode.OK in SEEN
    core = swarm.servers[1].core
    assert core.pending_forward == 0 and core.pending_backward == 0
    trainer = swarm.trainer(TrainerConfig(num_stages=2, call_budget_s=10.0))
    results = trainer.train_blocking(batches(2, 2, 8, seed=5), timeout_s=60)
    assert [r.error for r in results] == ["", ""]
    assert core.ledger.counters.applied == 2
    assert CRASHES.peak_growth_mib() < 512, CRASHES.peak_growth_mib()
