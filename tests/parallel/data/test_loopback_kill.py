"""Real peer processes on 127.0.0.1 averaging over gRPC; one is SIGKILLed mid-round.

Every survivor must finish within the round's deadline, and every element of its result
must equal the exact weighted mean of the inputs of the contributors it reports.
"""

from __future__ import annotations

import time

import pytest
import torch

from shoal.parallel.data.loopback import LoopbackSwarm, peer_input, peer_weight

pytestmark = pytest.mark.slow

NUMEL = 300_001
SEED = 11


def _expected(swarm: LoopbackSwarm, contributors: list[str]) -> torch.Tensor:
    ranks = [i for i, (hex_id, _) in enumerate(swarm.peers) if hex_id in contributors]
    assert len(ranks) == len(contributors)
    total = sum(peer_weight(r) for r in ranks)
    return sum(peer_input(NUMEL, SEED, r).double() * peer_weight(r) for r in ranks) / total


def _check(swarm, reply, path):
    result = torch.load(path)
    expect = _expected(swarm, reply["contributors"])
    assert torch.allclose(result.double(), expect, atol=1e-5, rtol=0)


def test_survivors_of_a_sigkill_mid_reduce_scatter_agree_on_an_exact_mean(tmp_path):
    swarm = LoopbackSwarm(4)
    try:
        swarm.configure(NUMEL, SEED)
        # A healthy round first: everyone contributes.
        outs = {i: {"out": str(tmp_path / f"r0-{i}.pt")} for i in range(4)}
        swarm.start_round(0, timeout_s=20.0, extra=outs)
        replies = [swarm.read(i, 60.0) for i in range(4)]
        assert all(r["ok"] for r in replies), replies
        for i, r in enumerate(replies):
            assert len(r["contributors"]) == 4
            _check(swarm, r, outs[i]["out"])

        # Peer 2 sends one contribution, stalls, and is killed there.
        timeout_s = 6.0
        outs = {i: {"out": str(tmp_path / f"r1-{i}.pt")} for i in range(4)}
        outs[2]["hold_after"] = 1
        start = time.monotonic()
        swarm.start_round(1, timeout_s=timeout_s, extra=outs)
        assert swarm.read(2, 30.0) == {"event": "held"}
        swarm.kill(2)
        survivors = [0, 1, 3]
        replies = {i: swarm.read(i, timeout_s + 10.0) for i in survivors}
        elapsed = time.monotonic() - start
        assert elapsed < timeout_s + 2.0, elapsed
        dead_id = swarm.peers[2][0]
        for i, r in replies.items():
            assert r["ok"], r
            assert dead_id not in r["contributors"]
            assert sorted(r["contributors"]) == sorted(swarm.peers[j][0] for j in survivors)
            _check(swarm, r, outs[i]["out"])
    finally:
        swarm.close()


def test_a_client_killed_mid_round_does_not_hold_up_the_reducers(tmp_path):
    # Peer 3 is a client: it reduces nothing and pulls its results. Killed after sending
    # one of its three parts, it is missing at two reducers, so the agreed set leaves it
    # out; the reducers neither wait for it to pull nor for its other parts past the
    # collect phase.
    swarm = LoopbackSwarm(4)
    try:
        swarm.configure(NUMEL, SEED, clients=(3,))
        outs = {i: {"out": str(tmp_path / f"c0-{i}.pt")} for i in range(4)}
        swarm.start_round(0, timeout_s=20.0, extra=outs)
        replies = [swarm.read(i, 60.0) for i in range(4)]
        assert all(r["ok"] for r in replies), replies
        for i, r in enumerate(replies):  # the client pulled the same exact mean
            assert len(r["contributors"]) == 4
            _check(swarm, r, outs[i]["out"])

        timeout_s = 6.0
        outs = {i: {"out": str(tmp_path / f"c1-{i}.pt")} for i in range(4)}
        outs[3]["hold_after"] = 1
        start = time.monotonic()
        swarm.start_round(1, timeout_s=timeout_s, extra=outs)
        assert swarm.read(3, 30.0) == {"event": "held"}
        swarm.kill(3)
        reducers = [0, 1, 2]
        replies = {i: swarm.read(i, timeout_s + 10.0) for i in reducers}
        assert time.monotonic() - start < timeout_s + 2.0
        for i, r in replies.items():
            assert r["ok"], r
            assert sorted(r["contributors"]) == sorted(swarm.peers[j][0] for j in reducers)
            _check(swarm, r, outs[i]["out"])
    finally:
        swarm.close()
