"""A stale DiLoCo peer catches up from a donor over loopback, fetching only the outer state."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from shoal.dht.peer import DHT
from shoal.net import Identity, NetConfig, NetRuntime
from shoal.state.announce import RefusedVersions, StateAnnouncer, state_key
from shoal.state.checkpoint import Snapshot
from shoal.state.snapshot import prepare
from shoal.state.sync_service import StateServer
from shoal.train.diloco import ResyncState
from shoal.train.diloco_strategy import resync_from_swarm


def _donor_snapshot(step: int, mode: str) -> Snapshot:
    g = torch.Generator().manual_seed(3)
    return Snapshot(
        step=step,
        files={
            "model": {"w": torch.randn(400, 500, generator=g)},
            "optimizer": {"state.0.exp_avg": torch.randn(400, 500, generator=g)},
            "extra": {
                "rng.torch_cpu": torch.get_rng_state(),
                "outer.master.0": torch.randn(400, 500, generator=g),
                "outer.momentum.0": torch.randn(400, 500, generator=g),
            },
        },
        file_meta={"optimizer": {"shoal.optimizer": '{"scalars": {}, "param_groups": []}'}},
        meta={"mode": mode, "round_index": 5},
    )


def _services(runtime=None, dht=None, key=b"k") -> SimpleNamespace:
    return SimpleNamespace(runtime=runtime, dht=dht, state_key=key, refused=RefusedVersions())


@contextlib.contextmanager
def _serving(snap: Snapshot, swarm: str, *more: Snapshot):
    """A donor that serves and announces ``snap`` (one more donor for each of ``more``),
    and a joiner's services to resync with."""
    joiner = NetRuntime(Identity.generate(), NetConfig(port=0)).start()
    joiner_dht = DHT(joiner)
    donors: list[tuple[NetRuntime, DHT]] = []
    key = state_key(swarm)
    try:
        for one in (snap, *more):
            donor = NetRuntime(Identity.generate(), NetConfig(port=0)).start()
            donor_dht = DHT(donor)
            donors.append((donor, donor_dht))
            donor_dht.bootstrap([joiner.address])
            served = prepare(one)
            StateServer(donor, lambda served=served: served)
            announcer = StateAnnouncer(donor_dht, key, lambda s=served: s, address=donor.address)
            assert donor.run(announcer.announce_once(), timeout_s=20)
        yield _services(joiner, joiner_dht, key), donors[0][0]
    finally:
        for donor, donor_dht in donors:
            donor_dht.close()
            donor.close()
        joiner_dht.close()
        joiner.close()


@pytest.mark.parametrize("mode", ["diloco", "sync"])
def test_a_stale_peer_fetches_the_outer_state_and_nothing_else(mode):
    snap = _donor_snapshot(40, mode)
    with _serving(snap, "resync") as (services, donor):
        assert resync_from_swarm(services, "diloco", newer_than=40) is None  # not fresher
        state = resync_from_swarm(services, "diloco", newer_than=10)
        if mode != "diloco":
            assert state is None  # another mode's outer state is not ours to adopt
            return
        assert state is not None and state.round_index == 5
        assert set(state.tensors) == {"outer.master.0", "outer.momentum.0"}
        for name, tensor in state.tensors.items():
            assert torch.equal(tensor, snap.files["extra"][name])
        sent = donor.traffic.snapshot()["services"]["shoal.v1.State"]["bytes_out"]
        outer_bytes = 2 * 400 * 500 * 4
        assert outer_bytes <= sent < outer_bytes * 1.05  # not the model, not AdamW


def test_a_streaming_peer_resyncs_from_a_donor_ahead_of_its_counts_whatever_its_step():
    # The donor that applied a round the others failed had the lowest step of the swarm
    # (steps are each peer's own): asking for a higher step never found it.
    snap = _donor_snapshot(40, "streaming")
    snap.meta["progress"] = [3, 5]
    with _serving(snap, "resync-streaming") as (services, _):
        assert resync_from_swarm(services, "streaming", ahead_of=[3, 5]) is None  # as far
        assert resync_from_swarm(services, "streaming", ahead_of=[9, 9]) is None  # behind
        state = resync_from_swarm(services, "streaming", newer_than=900, ahead_of=[3, 4])
        assert state is not None and state.step == 40
        assert set(state.tensors) == {"outer.master.0", "outer.momentum.0"}


def test_a_peer_tied_with_a_donor_finds_it_only_when_its_own_tag_is_greater():
    snap = _donor_snapshot(40, "diloco")
    snap.meta.update(progress=[3], progress_tag="5e0d")
    with _serving(snap, "resync-tie") as (services, _):
        assert resync_from_swarm(services, "diloco", ahead_of=[3]) is None
        assert resync_from_swarm(services, "diloco", ahead_of=[3], tag_below="0f00") is None
        state = resync_from_swarm(services, "diloco", ahead_of=[3], tag_below="a1b2")
        assert state is not None and state.step == 40


def test_a_refused_snapshot_is_passed_over_and_the_next_resync_finds_another_donor():
    # Every ask chose the freshest snapshot again, however often it had been refused: a
    # peer that needed state never got any while a donor served one it could not take.
    bad = _donor_snapshot(50, "diloco")
    bad.meta["round_index"] = "not a count"
    good = _donor_snapshot(40, "diloco")
    with _serving(bad, "resync-refused", good) as (services, bad_donor):
        assert resync_from_swarm(services, "diloco", newer_than=10) is None
        assert list(services.refused) == [prepare(bad).manifest.version]
        served = bad_donor.traffic.snapshot()["services"]["shoal.v1.State"]["bytes_out"]
        state = resync_from_swarm(services, "diloco", newer_than=10)
        assert state is not None and state.step == 40 and state.round_index == 5
        again = bad_donor.traffic.snapshot()["services"]["shoal.v1.State"]["bytes_out"]
        assert again == served  # nothing more was asked of it
        state.refuse()  # a strategy that cannot adopt it says so: neither is asked again
        assert resync_from_swarm(services, "diloco", newer_than=10) is None
        assert len(services.refused) == 2


@pytest.mark.parametrize("bad", [None, "7", [1], "x", float("inf"), -1, True, 2**60, 1.0])
def test_a_donor_s_meta_that_is_not_a_count_refuses_its_snapshot(monkeypatch, bad):
    # int() of it raised out of the resync, and so out of the stale peer's step loop.
    import shoal.train.diloco_strategy as ds

    snap = _donor_snapshot(40, "diloco")
    snap.meta["round_index"] = bad
    monkeypatch.setattr(ds, "fetch_snapshot_from_swarm", lambda *a, **k: snap)
    services = _services()
    assert resync_from_swarm(services, "diloco", ahead_of=[0]) is None
    snap.meta["round_index"] = 7
    state = resync_from_swarm(services, "diloco", ahead_of=[0])
    assert state is not None and state.round_index == 7


def _lowrank_strategy(monkeypatch, rank: int):
    """A DiLoCo strategy of ``rank`` on a 64x64 model, with no network."""
    import threading

    import shoal.train.diloco_strategy as ds
    from shoal.train.swarm_config import PeerOptions

    monkeypatch.setattr(ds, "swarm_rounds", lambda services, opts: None)
    torch.manual_seed(0)
    trainer = SimpleNamespace(model=torch.nn.Linear(64, 64), step=10)
    opts = PeerOptions(mode="diloco", rank=rank, local_steps=1)
    return ds.DiLoCoStrategy(trainer, SimpleNamespace(), opts, threading.Event())  # type: ignore[arg-type]


@pytest.mark.parametrize("donor_rank", [8, 4])
def test_a_resync_takes_the_masters_and_q_together_or_neither(monkeypatch, donor_rank):
    # From a peer of another rank, the masters were adopted and Q silently was not.
    import shoal.train.diloco_strategy as ds
    from shoal.train.swarm_round_config import RoundOutcome

    mine, donor = _lowrank_strategy(monkeypatch, 4), _lowrank_strategy(monkeypatch, donor_rank)
    donor.diloco.outer.step(torch.full((donor.diloco.outer.numel,), 0.01))
    donor.diloco.applied = 1
    donor.lowrank.q = {i: q + 0.5 for i, q in donor.lowrank.q.items()}
    tensors = {k: v for k, v in donor.state_tensors().items() if k.startswith("outer.")}
    monkeypatch.setattr(ds, "resync_from_swarm", lambda *a, **k: ResyncState(3, tensors, 40))
    masters = [m.clone() for m in mine.diloco.outer.master]
    q = {i: t.clone() for i, t in mine.lowrank.q.items()}
    mine.diloco.average = lambda vector, weight, index: RoundOutcome(False, reason="no group")
    mine.diloco.mark_stale()
    report = mine.diloco.run_round()
    if donor_rank != 4:  # refused whole: the round runs on this peer's own state
        assert not report.resynced and mine.diloco.applied == 0
        assert all(
            torch.equal(a, b) for a, b in zip(mine.diloco.outer.master, masters, strict=True)
        )
        assert all(torch.equal(mine.lowrank.q[i], q[i]) for i in q)
        assert mine.state_misfit(tensors) is not None and not mine.load_state(tensors, 3, 10)
        return
    assert report.resynced and mine.diloco.applied == 1
    assert mine.diloco.outer.fingerprint() == donor.diloco.outer.fingerprint()
    assert all(torch.equal(mine.lowrank.q[i], donor.lowrank.q[i]) for i in q)
