"""Collaborative sync: a step happens only once the swarm's samples reach the global batch."""

from __future__ import annotations

import msgpack
import pytest
import torch

from shoal.train.collaborative import (
    CollaborativeConfig,
    CollaborativeSync,
    ProgressRecord,
    global_samples,
    should_step,
)
from shoal.train.collaborative_strategy import parse_progress
from shoal.train.swarm_round_config import RoundOutcome

ME, OTHER, THIRD = b"a" * 32, b"b" * 32, b"c" * 32


def test_global_samples_counts_records_of_this_step_only() -> None:
    records = [
        ProgressRecord(OTHER, 3, 40),
        ProgressRecord(OTHER, 3, 50),  # newer count of the same peer
        ProgressRecord(THIRD, 2, 99),  # another step
        ProgressRecord(ME, 3, 1000),  # our own record: we know better
    ]
    assert global_samples(records, step=3, me=ME, my_samples=8) == 58
    assert should_step(64, 64, 8) and not should_step(63, 64, 8) and not should_step(99, 64, 0)


class Harness:
    """A one-parameter model whose peers' progress is scripted."""

    def __init__(self, others: int) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(2, 1, bias=False)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1.0)
        self.others = others
        self.now = 0.0
        self.published: list[tuple[int, int]] = []
        self.rounds: list[tuple[torch.Tensor, float, int]] = []
        self.ok = True
        self.alone = False
        self.caught_up = 0
        self.sync = CollaborativeSync(
            self.model,
            self.opt,
            CollaborativeConfig(target_batch=32, check_interval_s=1.0, grad_clip=0.0),
            me=ME,
            lr_at=lambda step: 1.0,
            publish=lambda step, samples: self.published.append((step, samples)),
            fetch=lambda: [ProgressRecord(OTHER, self.sync.step, self.others)],
            average=self.average,
            catch_up=self.catch_up,
            clock=lambda: self.now,
        )

    def average(self, vector: torch.Tensor, weight: float, index: int) -> RoundOutcome:
        self.rounds.append((vector.clone(), weight, index))
        if self.alone:
            return RoundOutcome(False, reason="alone: ...", skipped=True)
        if not self.ok:
            return RoundOutcome(False, reason="peer died")
        vector.mul_(0.5)  # pretend the other peer contributed zeros with equal weight
        return RoundOutcome(True, contributors=frozenset({1, 2}), weight=2 * weight, group_size=2)

    def catch_up(self) -> bool:
        self.caught_up += 1
        return True

    def micro_step(self, samples: int = 8) -> object:
        x = torch.ones(4, 2)
        self.model(x).sum().backward()
        self.now += 0.5
        return self.sync.after_backward(samples)


def test_sync_steps_only_when_the_global_batch_is_reached() -> None:
    h = Harness(others=16)
    w0 = h.model.weight.detach().clone()
    assert h.micro_step() is None  # 8 + 16 < 32
    assert h.sync.step == 0 and torch.equal(h.model.weight, w0)
    report = h.micro_step()  # 16 + 16 >= 32 (own count is exact between checks)
    assert report is not None and report.ok
    assert h.sync.step == 1 and len(h.rounds) == 1
    vector, weight, index = h.rounds[0]
    assert weight == 16.0 and index == 0
    # Sent: the mean gradient over our 2 micro-batches (d/dw of sum over 4 rows = 4);
    # applied: the swarm's average (halved by the fake all-reduce), lr 1.
    assert torch.allclose(vector, torch.tensor([4.0, 4.0]))
    assert torch.allclose(h.model.weight, w0 - 2.0)
    assert h.sync.samples == 0 and all(p.grad is None for p in h.model.parameters())


def test_sync_waits_while_the_swarm_is_short() -> None:
    h = Harness(others=0)
    for _ in range(3):
        assert h.micro_step() is None
    assert h.sync.step == 0 and not h.rounds
    assert h.published[-1] == (0, 24)
    assert h.micro_step() is not None  # 32 of our own


def test_failed_round_discards_gradients_and_catches_up() -> None:
    h = Harness(others=24)
    h.ok = False
    w0 = h.model.weight.detach().clone()
    report = h.micro_step()
    assert report is not None and not report.ok and report.resynced
    assert h.caught_up == 1 and h.sync.step == 0
    assert torch.equal(h.model.weight, w0)
    assert all(p.grad is None for p in h.model.parameters())


def test_a_peer_alone_keeps_accumulating_and_retries_only_now_and_then() -> None:
    # It used to drop its gradients, ask the swarm for state and try again at every
    # micro-batch: 48 round lines in 7 s, and no progress kept for when a peer joins.
    h = Harness(others=0)
    h.alone = True
    reports = [h.micro_step() for _ in range(4)]  # 32 of our own: the first try, at 2 s
    assert [r is not None for r in reports] == [False, False, False, True]
    assert not reports[-1].ok and reports[-1].reason == "alone: ..."
    assert h.caught_up == 0 and h.sync.samples == 32 and h.sync.step == 0
    grad = h.model.weight.grad.clone()
    quiet = [h.micro_step() for _ in range(9)]  # 4.5 s more: still within the 5 s hold-off
    assert all(r is None for r in quiet) and len(h.rounds) == 1
    assert torch.allclose(h.model.weight.grad, grad * 13 / 4)  # still accumulating
    h.alone = False  # a peer joined: the next try averages everything accumulated
    report = h.micro_step()
    assert report is not None and report.ok and h.sync.step == 1
    assert h.rounds[-1][1] == 8.0 * 14


def test_parse_progress_skips_malformed_records() -> None:
    good = msgpack.packb([5, 64])
    found = {
        OTHER: good,
        b"short": good,
        THIRD: msgpack.packb([5, "x"]),
        b"d" * 32: b"\xc1",
        b"e" * 32: msgpack.packb([True, 3]),
        b"f" * 32: msgpack.packb([-1, 3]),
    }
    assert parse_progress(found) == [(OTHER, 5, 64)]
    assert parse_progress(None) == [] and parse_progress(b"x") == []


def test_a_round_failed_by_stopping_downloads_no_state(monkeypatch):
    """SIGINT during a sync round makes it fail; the peer must then stop, not fetch (and
    throw away) the swarm's whole state first."""
    import threading

    import shoal.train.collaborative_strategy as cs

    def fetch(*args, **kwargs):
        raise AssertionError("a stopping peer fetched state")

    monkeypatch.setattr(cs, "fetch_snapshot_from_swarm", fetch)
    strategy = object.__new__(cs.SyncStrategy)
    strategy.stop = threading.Event()
    strategy.stop.set()
    assert strategy._catch_up() is False


@pytest.mark.parametrize("files", [{}, {"model": {"w": torch.zeros(2)}}])
def test_a_catch_up_snapshot_that_does_not_fit_is_refused_not_raised(monkeypatch, files):
    # A donor's snapshot without model tensors raised out of the catch-up (and the step
    # loop); one whose tensors do not load was asked for again at every later catch-up.
    import threading
    from types import SimpleNamespace

    import shoal.train.collaborative_strategy as cs
    from shoal.state.announce import RefusedVersions
    from shoal.state.checkpoint import Snapshot

    meta = {"mode": "sync", "config": {"model_shape": {"n_layer": 1}}}  # ours: checked first
    snap = Snapshot(step=9, files=files, meta=meta, version="v-bad")
    skipped = []

    def fetch(*args, refused, **kwargs):
        skipped.append(list(refused))
        return snap

    monkeypatch.setattr(cs, "fetch_snapshot_from_swarm", fetch)
    strategy = object.__new__(cs.SyncStrategy)
    strategy.stop = threading.Event()
    strategy.mode = "sync"
    strategy.services = SimpleNamespace(
        runtime=None, dht=None, state_key=b"k", refused=RefusedVersions()
    )
    windows = SimpleNamespace(shard_index=0, num_shards=1)
    trainer = SimpleNamespace(step=3, model=torch.nn.Linear(2, 2), optimizer=None, windows=windows)
    trainer.model_cfg = SimpleNamespace(to_dict=lambda: {"n_layer": 1})
    strategy.trainer = trainer
    assert strategy._catch_up() is False and trainer.step == 3
    assert strategy._catch_up() is False
    assert skipped == [[], ["v-bad"]]


def test_progress_records_outlive_a_round_in_progress():
    """A peer publishes nothing while it waits in a round: its record must still count for
    the others until the round's deadline, or they never reach the global batch with it."""
    from shoal.train.collaborative_strategy import progress_ttl_s
    from shoal.train.swarm_round_config import RoundsConfig

    for cfg in (
        RoundsConfig(),
        RoundsConfig(window_initial_s=5.0, window_cap_s=5.0, allreduce_timeout_s=5.0),
    ):
        assert progress_ttl_s(cfg) >= cfg.round_deadline_s
