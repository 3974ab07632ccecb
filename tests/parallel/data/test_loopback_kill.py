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


def _everyone_gets_the_exact_mean(swarm: LoopbackSwarm, tmp_path, k: int) -> None:
    """Round ``k`` with nobody failing: all four contribute and hold the same exact mean."""
    outs = {i: {"out": str(tmp_path / f"r{k}-{i}.pt")} for i in range(4)}
    swarm.start_round(k, timeout_s=20.0, extra=outs)
    replies = [swarm.read(i, 60.0) for i in range(4)]
    assert all(r["ok"] for r in replies), replies
    for i, r in enumerate(replies):
        assert len(r["contributors"]) == 4
        _check(swarm, r, outs[i]["out"])


def _survivors_agree_after_a_kill(swarm: LoopbackSwarm, tmp_path, k: int, victim: int) -> None:
    """Round ``k``: ``victim`` sends one contribution, stalls and is SIGKILLed there; the
    others finish within the deadline, without it, on the exact mean of the rest."""
    timeout_s = 6.0
    outs = {i: {"out": str(tmp_path / f"r{k}-{i}.pt")} for i in range(4)}
    outs[victim]["hold_after"] = 1
    start = time.monotonic()
    swarm.start_round(k, timeout_s=timeout_s, extra=outs)
    assert swarm.read(victim, 30.0) == {"event": "held"}
    swarm.kill(victim)
    survivors = [i for i in range(4) if i != victim]
    replies = {i: swarm.read(i, timeout_s + 10.0) for i in survivors}
    elapsed = time.monotonic() - start
    assert elapsed < timeout_s + 2.0, elapsed
    dead_id = swarm.peers[victim][0]
    for i, r in replies.items():
        assert r["ok"], r
        assert dead_id not in r["contributors"]
        assert sorted(r["contributors"]) == sorted(swarm.peers[j][0] for j in survivors)
        _check(swarm, r, outs[i]["out"])


def test_survivors_of_a_sigkill_mid_reduce_scatter_agree_on_an_exact_mean(tmp_path):
    swarm = LoopbackSwarm(4)
    try:
        swarm.configure(NUMEL, SEED)
        _everyone_gets_the_exact_mean(swarm, tmp_path, 0)
        _survivors_agree_after_a_kill(swarm, tmp_path, 1, victim=2)
    finally:
        swarm.close()


def test_a_client_killed_mid_round_does_not_hold_up_the_reducers(tmp_path):
    # Peer 3 is a client: it reduces nothing and pulls its results (round 0 checks that it
    # pulled the same exact mean). Killed after sending one of its three parts, it is
    # missing at two reducers, so the agreed set leaves it out; the reducers neither wait
    # for it to pull nor for its other parts past the collect phase.
    swarm = LoopbackSwarm(4)
    try:
        swarm.configure(NUMEL, SEED, clients=(3,))
        _everyone_gets_the_exact_mean(swarm, tmp_path, 0)
        _survivors_agree_after_a_kill(swarm, tmp_path, 1, victim=3)
    finally:
        swarm.close()
