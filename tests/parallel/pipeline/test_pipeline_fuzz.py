"""Malformed Stage requests are refused (status or ProtocolViolation) and harm nothing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline_harness import Swarm, batches, tiny

from shoal.errors import NetworkError, PeerUnavailable
from shoal.net.config import HealthConfig, NetConfig
from shoal.net.proto.v1 import stage_pb2 as pb
from shoal.parallel.pipeline import CODECS, PipelineTrainer, StageServerConfig, TrainerConfig
from shoal.parallel.pipeline.routing import Candidate

pytestmark = pytest.mark.timeout(180)

FUZZED: list[int] = []
DTYPES = [torch.float32, torch.float64, torch.int8, torch.uint8, torch.int64]


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[Swarm, PipelineTrainer, Candidate]]:
    swarm = Swarm(tiny(2), StageServerConfig(num_stages=2, accumulate=1, max_budget_s=30.0))
    try:
        swarm.server(0)
        last = swarm.server(1)
        # the fuzzing client never bans the server for the errors it provokes
        net = NetConfig(unix_socket=False, health=HealthConfig(ban_threshold=1e9))
        trainer = swarm.trainer(TrainerConfig(num_stages=2, call_budget_s=10.0), net)
        cand = Candidate(last.runtime.peer_id.raw, last.runtime.address, 1.0, 0)
        yield swarm, trainer, cand
    finally:
        swarm.close()


tensors = st.lists(
    st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 6), min_size=0, max_size=4)),
    max_size=3,
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    rid=st.binary(max_size=40),
    codec=st.sampled_from([*CODECS, "bogus", ""]),
    count=st.integers(0, 4),
    budget=st.sampled_from([-1.0, 0.0, 5.0, 1e9, float("nan")]),
    stage=st.integers(0, 3),
    has_targets=st.booleans(),
    specs=tensors,
    backward=st.booleans(),
)
def test_malformed_requests_are_refused(
    setup: tuple[Swarm, PipelineTrainer, Candidate],
    rid: bytes,
    codec: str,
    count: int,
    budget: float,
    stage: int,
    has_targets: bool,
    specs: list[tuple[torch.dtype, list[int]]],
    backward: bool,
) -> None:
    swarm, trainer, cand = setup
    payload = [torch.zeros(shape, dtype=dtype) for dtype, shape in specs]
    if backward:
        meta: object = pb.BackwardRequest(
            request_id=rid, stage=stage, codec=codec, payload_tensors=count, budget_s=budget
        )
        method = "Backward"
    else:
        meta = pb.ForwardRequest(
            request_id=rid,
            stage=stage,
            codec=codec,
            payload_tensors=count,
            budget_s=budget,
            has_targets=has_targets,
        )
        method = "Forward"
    try:
        reply, _ = trainer.runtime.run(trainer._call(cand, method, meta, payload), 20.0)
    except PeerUnavailable:
        raise
    except NetworkError:
        pass  # refused: ProtocolViolation, or RemoteError when it ended the call mid-stream
    else:
        assert reply.status != pb.OK
    core = swarm.servers[1].core
    FUZZED.append(1)
    assert core.ledger.counters.applied == 0
    assert core.pending_forward == 0 and core.pending_backward == 0


def test_server_still_serves_after_fuzzing(setup: tuple[Swarm, PipelineTrainer, Candidate]) -> None:
    swarm, _, _ = setup
    assert len(FUZZED) >= 40  # every example reached the server and was refused
    # a fresh client: the fuzzing one's connection pool holds the errors against the server
    trainer = swarm.trainer(TrainerConfig(num_stages=2, call_budget_s=10.0))
    results = trainer.train_blocking(batches(4, 2, 8, seed=9), timeout_s=60)
    assert [r.error for r in results] == [""] * 4
    assert swarm.servers[1].core.ledger.counters.applied == 4
