"""Real stage servers and trainers on 127.0.0.1 (one NetRuntime and DHT node per peer)."""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from collections.abc import Iterator

import pytest
import torch
from pipeline_harness import Swarm, batches, tiny

from shoal.parallel.pipeline import MicroBatchResult, StageServerConfig, TrainerConfig
from shoal.parallel.pipeline.model import build_stages

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def swarm_factory() -> Iterator[list[Swarm]]:
    made: list[Swarm] = []
    yield made
    for swarm in made:
        swarm.close()


def make(made: list[Swarm], **server: object) -> Swarm:
    swarm = Swarm(tiny(), StageServerConfig(**server))  # type: ignore[arg-type]
    made.append(swarm)
    return swarm


def test_pipelined_loss_matches_single_process(swarm_factory: list[Swarm]) -> None:
    torch.manual_seed(0)
    micro, steps, lr = 4, 3, 3e-3
    swarm = make(swarm_factory, num_stages=4, accumulate=micro, lr=lr, seed=5)
    for k in range(4):
        swarm.server(k)
    trainer = swarm.trainer(TrainerConfig(num_stages=4, max_inflight=micro))
    data = batches(micro, 2, 16, seed=1) * steps  # the same batches each step: loss falls
    got: list[float] = []
    for s in range(steps):  # one optimizer step per `micro` micro-batches, on every server
        results = trainer.train_blocking(data[s * micro : (s + 1) * micro], timeout_s=60)
        assert [r.error for r in results] == [""] * micro
        got += [r.loss for r in results]
    assert [srv.core.steps for srv in swarm.servers] == [steps] * 4

    stages = build_stages(tiny(), 4, seed=5)  # the same model in one process
    params = [p for st in stages for p in st.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    want: list[float] = []
    for s in range(steps):
        for x, y in data[s * micro : (s + 1) * micro]:
            h = x.long()
            for st in stages[:-1]:
                h = st(h)
            loss = stages[-1](h, y.long())
            (loss / micro).backward()
            want.append(float(loss.detach()))
        opt.step()
        opt.zero_grad()
    assert got == pytest.approx(want, abs=1e-5)
    assert sum(want[-micro:]) < sum(want[:micro])  # it trained


def test_killed_server_loses_no_micro_batch_and_applies_none_twice(
    swarm_factory: list[Swarm],
) -> None:
    swarm = make(
        swarm_factory, num_stages=3, accumulate=4, announce_period_s=0.5, announce_ttl_s=5.0
    )
    swarm.server(0)
    victim = swarm.server(1)
    survivor = swarm.server(1)
    swarm.server(2)
    trainer = swarm.trainer(
        TrainerConfig(num_stages=3, max_inflight=6, call_budget_s=10.0, refresh_period_s=0.5)
    )
    n = 40
    seen: list[MicroBatchResult] = []
    halfway = threading.Event()

    def on_result(res: MicroBatchResult) -> None:
        seen.append(res)
        if len(seen) >= 12:
            halfway.set()

    # The victim is killed holding a trainer's call: killed between calls, it was sometimes
    # routed around before any call failed, and the fault never hit the trainer.
    holding, release = threading.Event(), threading.Event()
    forward, close = victim.core.forward_job, victim.core.close

    def held_forward(*args: object, **kwargs: object) -> object:
        if halfway.is_set() and not holding.is_set():
            holding.set()
            release.wait(60)  # until the kill has closed its runtime
        return forward(*args, **kwargs)

    def releasing_close() -> None:
        release.set()
        close()

    victim.core.forward_job = held_forward  # type: ignore[method-assign]
    victim.core.close = releasing_close  # type: ignore[method-assign]
    future = trainer.runtime.submit(trainer.train(batches(n, 2, 16, seed=2), on_result))
    assert halfway.wait(60), "training did not get halfway"
    applied_before_kill = victim.core.ledger.counters.applied
    assert holding.wait(60), "no call reached the victim after halfway"
    swarm.kill(victim)
    results = future.result(90)

    assert [r.error for r in results] == [""] * n
    assert applied_before_kill > 0
    assert trainer.counters.failures >= 1  # the fault really hit the trainer
    everything = list(range(n))
    for stage in range(3):
        acked = collections.Counter(r.acks[stage] for r in results)
        assert all(v == 1 for v in acked.values()) and len(acked) == n
    # stage 1: what the survivor applied plus what the victim applied *and acknowledged*
    # is every micro-batch exactly once; what the victim applied without an answer (lost
    # with it) was applied again by the survivor.
    victim_id, survivor_id = victim.runtime.peer_id.raw, survivor.runtime.peer_id.raw
    victim_acked = [r.micro_batch for r in results if r.acks[1][0] == victim_id]
    survivor_applied = survivor.core.ledger.counters.applied_micro_batches
    assert len(set(survivor_applied)) == len(survivor_applied)  # never twice on one server
    assert sorted(survivor_applied + victim_acked) == everything
    assert all(r.acks[1][0] in (victim_id, survivor_id) for r in results)
    victim_applied = victim.core.ledger.counters.applied_micro_batches
    assert set(victim_acked) <= set(victim_applied)
    assert set(victim_applied) - set(victim_acked) <= set(survivor_applied)
    for server in (swarm.servers[0], swarm.servers[3]):  # single servers: each exactly once
        assert sorted(server.core.ledger.counters.applied_micro_batches) == everything


def test_rebalancing_fills_an_unserved_stage(swarm_factory: list[Swarm]) -> None:
    swarm = make(swarm_factory, num_stages=3, accumulate=2, min_dwell_s=0.0)
    a, b = swarm.server(0), swarm.server(0)
    swarm.server(1)
    # nobody serves stage 2: both stage-0 servers evaluate at once, exactly one moves
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        moves = list(pool.map(lambda s: s.runtime.run(s.rebalance(), timeout_s=30), [a, b]))
    assert sorted(moves, key=str) == [2, None] or sorted(moves, key=str) == [None, 2]
    mover = a if moves[0] == 2 else b
    assert mover.stage == 2 and mover.loaded_from == "seed" and mover.moves == 1
    assert {a.stage, b.stage} == {0, 2}
    trainer = swarm.trainer(TrainerConfig(num_stages=3, max_inflight=4))
    results = trainer.train_blocking(batches(8, 2, 16, seed=3), timeout_s=60)
    assert [r.error for r in results] == [""] * 8
    assert mover.core.ledger.counters.applied == 8
    # a newcomer with --stage auto joins the least-served stage; loading from its peer
    newcomer = swarm.server("auto")
    assert newcomer.loaded_from == "peer"
    mine = dict(newcomer.core.module.state_dict())
    theirs = next(s for s in swarm.servers[:3] if s.stage == newcomer.stage)
    ref = theirs.core.module.state_dict()
    assert all(torch.equal(mine[k], ref[k]) for k in ref)


def test_busy_server_is_routed_around(swarm_factory: list[Swarm]) -> None:
    swarm = make(swarm_factory, num_stages=1, accumulate=2, max_queue=2)
    full, free = swarm.server(0), swarm.server(0)
    full.core.pending_forward = 2  # its queue is full: every forward gets BUSY
    trainer = swarm.trainer(TrainerConfig(num_stages=1, max_inflight=2, busy_backoff_s=0.01))
    results = trainer.train_blocking(batches(12, 2, 8, seed=4), timeout_s=60)
    assert [r.error for r in results] == [""] * 12
    assert full.core.ledger.counters.applied == 0 and free.core.ledger.counters.applied == 12
    assert trainer.counters.busy >= 1 and trainer.counters.failures == 0


def test_same_stage_servers_average_their_weights(swarm_factory: list[Swarm]) -> None:
    swarm = make(swarm_factory, num_stages=1, accumulate=1, average_period_s=3600.0)
    a, b = swarm.server(0), swarm.server(0)
    trainer = swarm.trainer(TrainerConfig(num_stages=1, max_inflight=1))
    trainer.train_blocking(batches(6, 2, 8, seed=5), timeout_s=60)  # they drift apart
    pa = [p.detach().clone() for p in a.core.module.parameters()]
    pb_ = [p.detach().clone() for p in b.core.module.parameters()]
    assert any(not torch.equal(x, y) for x, y in zip(pa, pb_, strict=True))
    futures = [s.runtime.submit(s.averaging.average_once(epoch=1)) for s in (a, b)]
    assert [f.result(30) for f in futures] == [True, True]
    for x, y, p, q in zip(
        pa, pb_, a.core.module.parameters(), b.core.module.parameters(), strict=True
    ):
        assert torch.allclose(p, (x + y) / 2, atol=1e-6)
        assert torch.allclose(q, (x + y) / 2, atol=1e-6)


def test_entry_points_serve_and_train() -> None:
    from shoal.net.config import NetConfig
    from shoal.parallel.pipeline import StageServer, run_pipeline_trainer, serve_stage

    stop = threading.Event()
    started: list[StageServer] = []
    ready = threading.Semaphore(0)
    config = StageServerConfig(num_stages=2, accumulate=2)
    overrides = {"n_layer": 2, "d_model": 64, "max_seq_len": 64}

    def serve(stage: int | str, join: list[str]) -> None:
        serve_stage(
            stage=stage,
            model_overrides=overrides,
            join=join,
            config=config,
            net=NetConfig(unix_socket=False),
            stop=stop,
            ready=lambda s: (started.append(s), ready.release()),
        )

    threads = [threading.Thread(target=serve, args=(0, []), daemon=True)]
    threads[0].start()
    try:
        assert ready.acquire(timeout=60)
        join = [started[0].runtime.address]
        threads.append(threading.Thread(target=serve, args=("auto", join), daemon=True))
        threads[1].start()
        assert ready.acquire(timeout=60)
        assert sorted(s.stage for s in started) == [0, 1]  # auto took the empty stage
        results = run_pipeline_trainer(
            join=join,
            model_overrides=overrides,
            config=TrainerConfig(num_stages=2, max_inflight=4),
            net=NetConfig(unix_socket=False),
            data=batches(6, 2, 16, seed=6),
            timeout_s=60,
        )
        assert [r.error for r in results] == [""] * 6
        assert all(s.core.ledger.counters.applied == 6 for s in started)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not any(t.is_alive() for t in threads)


def test_periodic_rebalancing_moves_by_itself(swarm_factory: list[Swarm]) -> None:
    swarm = make(swarm_factory, num_stages=2, min_dwell_s=0.0, rebalance_period_s=0.3)
    a, b = swarm.server(0), swarm.server(0)  # nobody on stage 1
    assert a.moved.wait(20) or b.moved.wait(5)
    assert sorted([a.stage, b.stage]) == [0, 1] and a.moves + b.moves == 1
