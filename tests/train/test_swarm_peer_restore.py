"""Where a restarting shoal peer continues from: a checkpoint that does not fit, and the
local progress written at failed rounds and at the end."""

from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from shoal.errors import ConfigError
from shoal.state.background import BackgroundCheckpointer
from shoal.state.checkpoint import load_latest_valid, write_snapshot
from shoal.state.recovery import Recovered, Source, recover
from shoal.state.snapshot import as_checkpoint
from shoal.train.diloco_streaming import StreamingDiLoCo
from shoal.train.outer import OuterConfig
from shoal.train.run_state import checkpoint_root
from shoal.train.swarm_config import PeerOptions
from shoal.train.swarm_peer import _restore, build_trainer, run_peer
from shoal.train.swarm_round_config import RoundOutcome
from shoal.train.swarm_state import (
    APPLIED_FILE,
    AppliedRounds,
    drop_stale_local,
    keep_own_local,
    last_applied_count,
    restore_peer,
    snapshot_peer,
)


def _checkpoint(opts: PeerOptions, step: int, root: Path, strategy=None, applied_rounds=None):
    trainer = build_trainer(opts, 7)
    snap = snapshot_peer(
        step,
        trainer.model,
        trainer.optimizer,
        trainer.windows,
        strategy=strategy or {},
        round_index=3,
        mode=opts.mode,
        model_shape=trainer.model_cfg.to_dict(),
        data_seed=7,
        applied_rounds=applied_rounds,
    )
    write_snapshot(snap, root)
    return load_latest_valid(root)


def _restore_into(trainer, ckpt, mode: str):
    """``ckpt`` loaded into ``trainer``'s objects, as a peer of ``mode`` built with seed 7."""
    return restore_peer(
        ckpt,
        trainer.model,
        trainer.optimizer,
        trainer.windows,
        mode=mode,
        model_shape=trainer.model_cfg.to_dict(),
        data_seed=7,
    )


def _streaming(params, **overrides) -> StreamingDiLoCo:
    """Streaming DiLoCo over ``params``; by default 2 fragments and rounds that never end."""
    settings = dict(
        local_steps=4,
        fragments=2,
        overlap_steps=2,
        mix_alpha=0.5,
        outer=OuterConfig(),
        launch=lambda *_: concurrent.futures.Future(),
    )
    return StreamingDiLoCo(list(params), **{**settings, **overrides})


def test_every_tensor_of_the_streaming_state_survives_a_snapshot(tmp_path: Path) -> None:
    # Restores pass on the ``outer.*`` tensors only: the mark of the fragment in flight was
    # once named otherwise, and dropped.
    opts = PeerOptions(mode="streaming", run_dir=tmp_path)
    trainer = build_trainer(opts, 7)
    streaming = _streaming(trainer.model.parameters())
    streaming.after_local_step(8)
    streaming.after_local_step(8)  # fragment 0 in flight
    tensors = streaming.state_tensors()
    ckpt = _checkpoint(opts, 40, checkpoint_root(tmp_path), strategy=tensors)
    restored = _restore_into(trainer, ckpt, "streaming")
    assert restored.strategy.keys() == tensors.keys()
    again = _streaming(trainer.model.parameters())
    assert again.load_state(restored.strategy) and again.unsettled == {0}


@pytest.mark.parametrize("compression", [{"topk": 0.1, "wire_codec": "sparse"}, {"rank": 2}])
def test_the_error_feedback_survives_a_restart_from_our_own_disk_only(
    tmp_path: Path, compression: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It is this peer's progress the swarm has not seen: a restart once dropped it.
    import shoal.train.diloco_strategy as ds
    from shoal.train.diloco_strategy import DiLoCoStrategy

    monkeypatch.setattr(ds, "swarm_rounds", lambda services, opts: None)  # no network here
    opts = PeerOptions(mode="diloco", run_dir=tmp_path, **compression)
    trainer = build_trainer(opts, 7)
    services = SimpleNamespace(monitor=None)
    first = DiLoCoStrategy(trainer, services, opts, threading.Event())  # type: ignore[arg-type]
    numel = sum(p.numel() for p in trainer.model.parameters())
    residual = torch.randn(numel)
    if first.topk is not None:
        first.topk.feedback.residual = residual
    else:
        first.lowrank.error = {i: torch.randn_like(e) for i, e in first.lowrank.error.items()}
    tensors = first.state_tensors()
    local = {k for k in tensors if k.startswith("local.")}
    assert local
    ckpt = _checkpoint(opts, 30, checkpoint_root(tmp_path), strategy=tensors, applied_rounds=6)
    assert set(ckpt.local) == local and not local & set(ckpt.extra)  # written, not served
    restored = _restore_into(trainer, ckpt, "diloco")
    again = DiLoCoStrategy(trainer, services, opts, threading.Event())  # type: ignore[arg-type]
    assert again.load_state(restored.strategy, restored.round_index, restored.applied_step)
    for name in local:
        assert torch.equal(again.state_tensors()[name], tensors[name])
    # A donor's snapshot has no local file: a peer restoring from one takes its own back
    # from its disk (recovery reads it whatever the source), and without one has none.
    from_donor = _restore_into(trainer, as_checkpoint(_snapshot_of(ckpt), "donor"), "diloco")
    assert not any(k.startswith("local.") for k in from_donor.strategy)
    found = recover(checkpoint_root(tmp_path), None, None, b"key")
    shape = trainer.model_cfg.to_dict()

    def keep(mode="diloco", model_shape=shape, noted=6):  # taken after 6 applied rounds
        own, meta = found.own_local, found.own_meta
        kept = keep_own_local(
            from_donor, own, meta, mode=mode, model_shape=model_shape, noted_count=noted
        )
        return kept, kept is not from_donor

    # not from a checkpoint of another mode or model, nor one taken before a round this
    # peer applied (its feedback went into that round), nor when that is not known
    assert not keep(mode="streaming")[1] and not keep(model_shape={**shape, "n_layer": 9})[1]
    assert not keep(noted=7)[1] and not keep(noted=None)[1]
    # the same rule for a restore from our own disk: its own state goes when it is stale
    assert restored.applied_rounds == 6 and drop_stale_local(restored, 6) is restored
    for noted in (7, None):
        stale = drop_stale_local(restored, noted)
        assert stale.strategy.keys() == restored.strategy.keys() - local
    for source, want in ((from_donor, False), (keep()[0], True)):
        fresh = DiLoCoStrategy(trainer, services, opts, threading.Event())  # type: ignore[arg-type]
        fresh.load_state(source.strategy, source.round_index, source.applied_step)
        got = fresh.state_tensors()
        if want:
            assert all(torch.equal(got[name], tensors[name]) for name in local)
        elif fresh.topk is not None:
            assert fresh.topk.feedback.residual is None
        else:
            assert all(e.abs().max() == 0 for e in fresh.lowrank.error.values())


def _snapshot_of(ckpt):
    """A loaded checkpoint as a snapshot a donor sends, ``local`` file included (a donor
    that sends one anyway: it must not be read)."""
    from shoal.state.checkpoint import Snapshot

    files = {"model": ckpt.model, "extra": ckpt.extra, "local": ckpt.local}
    return Snapshot(step=ckpt.step, files=files, meta=ckpt.meta)


def test_a_run_dir_of_another_mode_is_refused_not_silently_started_over(tmp_path: Path) -> None:
    # Starting from step 0 there used to rotate the run dir's checkpoints away one by one.
    opts = PeerOptions(mode="sync", run_dir=tmp_path)
    own = _checkpoint(opts, 40, checkpoint_root(tmp_path))
    diloco = PeerOptions(mode="diloco", run_dir=tmp_path)
    trainer = build_trainer(diloco, 7)
    found = Recovered(Source.DISK, own, 40, None)
    with pytest.raises(ConfigError, match=r"cannot continue from .*mode 'sync'.*--run-dir"):
        _restore(found, diloco, trainer, trainer.model_cfg.to_dict(), 7)


def test_a_swarm_snapshot_that_does_not_fit_falls_back_to_our_own(tmp_path: Path) -> None:
    opts = PeerOptions(mode="diloco", run_dir=tmp_path / "me")
    _checkpoint(opts, 20, checkpoint_root(opts.run_dir))
    wide = PeerOptions(mode="diloco", run_dir=tmp_path / "other", model_overrides={"d_model": 96})
    theirs = _checkpoint(wide, 60, tmp_path / "other")
    trainer = build_trainer(opts, 7)
    found = Recovered(Source.SWARM, theirs, 20, 60)
    source, restored = _restore(found, opts, trainer, trainer.model_cfg.to_dict(), 7)
    assert source is Source.DISK and restored is not None and restored.step == 20


def test_a_swarm_snapshot_whose_outer_state_does_not_fit_is_not_restored_at_all(
    tmp_path: Path,
) -> None:
    # Checked before the model is loaded: a model taken from a snapshot whose outer state
    # was then refused left the peer training on half of it.
    theirs_opts = PeerOptions(mode="streaming", run_dir=tmp_path / "other", fragments=2)
    donor = _streaming(build_trainer(theirs_opts, 7).model.parameters())
    theirs = _checkpoint(theirs_opts, 60, tmp_path / "other", strategy=donor.state_tensors())
    for tensor in theirs.model.values():
        tensor.add_(1.0)
    opts = PeerOptions(mode="streaming", run_dir=tmp_path / "me", fragments=4)
    trainer = build_trainer(opts, 7)
    mine = _streaming(trainer.model.parameters(), fragments=4)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    found = Recovered(Source.SWARM, theirs, None, 60)
    shape = trainer.model_cfg.to_dict()
    source, restored = _restore(found, opts, trainer, shape, 7, fits=mine.state_misfit)
    assert source is Source.NONE and restored is None
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


@pytest.mark.parametrize(
    "meta",
    [
        {"round_index": None},
        {"round_index": "x"},
        {"round_index": 1e400},
        {"config": []},
        {"data": "x"},
        {"data": {"shard_index": 0, "num_shards": 1, "seed": 7, "batches_drawn": [1]}},
    ],
)
def test_a_swarm_snapshot_with_meta_no_peer_writes_falls_back_to_our_own(
    tmp_path: Path, meta: dict
) -> None:
    # A donor's meta is whatever it sent: int() of it raised out of the restore.
    opts = PeerOptions(mode="diloco", run_dir=tmp_path / "me")
    _checkpoint(opts, 20, checkpoint_root(opts.run_dir))
    theirs = _checkpoint(opts, 60, tmp_path / "other")
    theirs = replace(theirs, meta={**theirs.meta, **meta})
    for tensor in theirs.model.values():
        tensor.add_(1.0)
    trainer = build_trainer(opts, 7)
    shape = trainer.model_cfg.to_dict()
    found = Recovered(Source.SWARM, theirs, 20, 60)
    source, restored = _restore(found, opts, trainer, shape, 7)
    assert source is Source.DISK and restored is not None and restored.step == 20
    # checked before anything is loaded: with no copy of our own, the model is untouched
    fresh = build_trainer(opts, 7)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    found = Recovered(Source.SWARM, theirs, None, 60)
    assert _restore(found, replace(opts, run_dir=tmp_path / "new"), fresh, shape, 7) == (
        Source.NONE,
        None,
    )
    assert all(torch.equal(v, before[k]) for k, v in fresh.model.state_dict().items())


def _lone_peer(tmp_path: Path, **settings: object) -> PeerOptions:
    """A peer that runs a few steps alone, quickly."""
    return PeerOptions(
        run_dir=tmp_path / "run", window_s=0.3, heartbeat_s=1.0, eval_batches=1, **settings
    )


def test_a_peer_keeps_its_unaveraged_progress_across_a_restart(tmp_path: Path) -> None:
    # Alone, no round is applied: progress used to be checkpointed only after applied
    # rounds, so a restart went back to step 0 (and a stop at step 110 restarted at 100).
    events: list[tuple[str, dict]] = []

    def emit(event: str, **fields: object) -> None:
        events.append((event, fields))

    opts = _lone_peer(tmp_path, mode="diloco", steps=25, local_steps=10, report_every=5)
    assert run_peer(opts, threading.Event(), emit) == 0
    rounds = [f for e, f in events if e == "round"]
    assert [r["step"] for r in rounds] == [10, 20] and not any(r["ok"] for r in rounds)
    # alone, a round is not even tried (no window is waited for), says why and is not
    # counted: a peer alone for a while must not run ahead of the peers that join it
    assert all(r["reason"].startswith("alone: no other live peer") for r in rounds)
    assert all(r["round"] == 0 and r["seconds"] == {} for r in rounds)
    # a round's line comes before the step line of the same step
    order = [(e, f["step"]) for e, f in events if e in ("round", "step")]
    assert order.index(("round", 10)) < order.index(("step", 10))
    written = [f["step"] for e, f in events if e == "checkpoint"]
    assert written[-1] == 25  # the steps after the last round too
    # ...and it says that no round was applied: after a restart, swarm state of any step
    # above that is taken (it used to count as fresh as step 25, so a peer that had trained
    # alone for long kept its stale outer state and never met the swarm again)
    saved = load_latest_valid(checkpoint_root(opts.run_dir))
    assert saved is not None and saved.step == 25 and saved.meta["applied_step"] == 0
    events.clear()
    assert run_peer(replace(opts, steps=26), threading.Event(), emit) == 0
    recovered = next(f for e, f in events if e == "recovered")
    assert recovered == {"source": "disk", "step": 25, "round": 0}


def test_progress_written_but_not_served_stays_off_the_swarm(tmp_path: Path) -> None:
    opts = PeerOptions(mode="diloco", run_dir=tmp_path)
    trainer = build_trainer(opts, 7)

    def provider(step: int, averaged: bool = True):
        return lambda: snapshot_peer(
            step,
            trainer.model,
            trainer.optimizer,
            trainer.windows,
            strategy={},
            round_index=1,
            mode="diloco",
            model_shape=trainer.model_cfg.to_dict(),
            data_seed=7,
            averaged=averaged,
        )

    with BackgroundCheckpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(10, provider(10), write=False)
        ckpt.save(15, provider(15, averaged=False), write=True, serve=False)
        assert ckpt.flush(10.0)
        served = ckpt.latest_served()
        assert served is not None and served.step == 10
    newest = load_latest_valid(tmp_path / "ckpt")
    assert newest is not None and newest.step == 15
    # ...and a restart from it knows not to serve it either (see run_peer's startup save)
    restored = _restore_into(trainer, newest, "diloco")
    assert restored.step == 15 and not restored.averaged
    assert restored.applied_step == 15  # by default, the snapshot's own step


def test_a_streaming_peer_s_snapshots_carry_its_fragment_counts(tmp_path: Path) -> None:
    # They are announced with the snapshot: resyncs choose donors by them, not by step.
    opts = _lone_peer(
        tmp_path, mode="streaming", steps=8, local_steps=4, fragments=2, report_every=4
    )
    assert run_peer(opts, threading.Event(), lambda event, **fields: None) == 0
    saved = load_latest_valid(checkpoint_root(opts.run_dir))
    assert saved is not None and saved.step == 8 and saved.meta["progress"] == [0, 0]


def test_a_run_dir_whose_outer_state_does_not_fit_stops_the_peer(tmp_path: Path) -> None:
    # Restarted with other fragments, it used to go on with some fragments restored and
    # the others not.
    opts = _lone_peer(
        tmp_path, mode="streaming", steps=8, local_steps=4, fragments=2, report_every=4
    )
    assert run_peer(opts, threading.Event(), lambda event, **fields: None) == 0
    again = replace(opts, steps=12, fragments=4)
    with pytest.raises(ConfigError, match=r"cannot continue from .*outer state does not fit"):
        run_peer(again, threading.Event(), lambda event, **fields: None)


def test_applied_rounds_are_counted_across_restarts_and_noted(tmp_path: Path) -> None:
    assert last_applied_count(tmp_path) is None  # no note: not known
    first = AppliedRounds(tmp_path, {})
    first.applied()
    first.applied()
    assert first.count == 2 and last_applied_count(tmp_path) == 2
    assert not list(tmp_path.glob("*.tmp"))
    # a restart goes on from the larger of the note and its own newest checkpoint
    assert AppliedRounds(tmp_path, {"applied_rounds": 1}).count == 2
    assert AppliedRounds(tmp_path, {"applied_rounds": 9}).count == 9
    for bad in (b"{", b'{"applied": -1}', b'{"applied": 1.5}', b"[]", b" " * 300 + b"{}"):
        (tmp_path / APPLIED_FILE).write_bytes(bad)
        assert last_applied_count(tmp_path) is None, bad
    # a note that cannot be written is removed: no older note vouches for stale state
    (tmp_path / APPLIED_FILE).write_text('{"applied": 3}')
    blocked = AppliedRounds(tmp_path, {})
    (tmp_path / (APPLIED_FILE + ".tmp")).mkdir()  # the temporary file cannot be created
    blocked.applied()
    assert blocked.count == 4 and last_applied_count(tmp_path) is None


def _left_out_round(vector, weight, index):
    vector.fill_(-0.5)  # the others' mean; this peer was late for it
    return RoundOutcome(
        True, contributors=frozenset({"other"}), weight=1.0, group_size=2, included=False
    )


def test_a_peer_restored_from_a_donor_starts_from_the_outer_parameters() -> None:
    # A donor serves its model as trained: after a round that left it out, that is the
    # outer parameters plus its own progress, which it sends in its next round itself. A
    # joiner starting from that model sent the donor's progress a second time.
    from shoal.train.diloco import DiLoCo, DiLoCoConfig
    from shoal.train.swarm_peer import _load_strategy
    from shoal.train.swarm_state import Restored

    cfg = DiLoCoConfig(local_steps=1, outer=OuterConfig(lr=1.0, momentum=0.0))
    donor = DiLoCo([torch.zeros(4)], cfg, _left_out_round)
    donor.params[0].add_(3.0)  # local progress
    assert donor.after_local_step(8).ok
    assert torch.equal(donor.params[0] - donor.outer.master[0], torch.full((4,), 3.0))

    for source, progress in ((Source.SWARM, 0.0), (Source.DISK, 3.0)):
        joiner = DiLoCo([donor.params[0].clone()], cfg, _left_out_round)  # the served model
        strategy = SimpleNamespace(
            load_state=lambda t, i, a, j=joiner: j.load_state(t, i),
            start_from_outer=joiner.start_from_outer,
        )
        restored = Restored(step=8, round_index=donor.round_index, strategy=donor.state_tensors())
        _load_strategy(strategy, restored, source)
        # From a donor: no pseudo-gradient before any training. From our own disk: our own
        # progress, which no one else has sent.
        assert torch.equal(joiner.outer.pseudo_gradient(joiner.params), torch.full((4,), -progress))


def test_a_streaming_peer_restored_from_a_donor_starts_from_every_fragment_s_outer() -> None:
    def launch(vector, weight, index, fragment, fingerprint):
        done = concurrent.futures.Future()
        done.set_result(RoundOutcome(True, contributors=frozenset({"me"}), weight=weight))
        return done

    settings = dict(local_steps=2, overlap_steps=0, outer=OuterConfig(lr=1.0, momentum=0.0))
    params = [torch.zeros(4), torch.zeros(4)]
    donor = _streaming(params, launch=launch, **settings)
    for p in params:
        p.add_(1.0)
    donor.after_local_step(1)  # fragment 0 syncs; fragment 1 holds unsent progress
    joiner = _streaming([p.clone() for p in params], launch=launch, **settings)
    assert joiner.load_state(donor.state_tensors())
    joiner.start_from_outer()
    for f in range(2):
        assert torch.equal(joiner.fragment_params(f)[0], donor.outers[f].master[0])
