"""``run_peer``: one data-parallel swarm peer, from startup recovery to clean shutdown.

Startup: identity from ``<run-dir>/key`` (the same PeerID across restarts), the network
services (``swarm_services.py``), the local trainer on this peer's data stream, then
recovery — the newest valid checkpoint on disk or the freshest snapshot announced by the
swarm, whichever is ahead — and the strategy (``sync``, ``diloco`` or ``streaming``). The
loop trains until ``steps`` or a stop request; after every applied round it hands a
snapshot to the background checkpointer (served to joiners every round, written to disk
every ``checkpoint_every_rounds``). Local progress the swarm has not averaged yet (steps
since the last applied round) is written to disk, never served: after a failed round
(``checkpoint_every_rounds`` apart too, so a peer alone keeps its work) and when the loop
ends, so a restart continues from the step it stopped at. Shutdown closes everything in
reverse order.

Progress goes through ``emit(event, **fields)``: ``listening``, ``recovered``, ``ready``,
``step``, ``round``, ``eval``, ``checkpoint``, ``stopped`` (see ``docs/peer.md``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from shoal.errors import CheckpointError, ConfigError, NetworkError
from shoal.models.data import TrainWindows
from shoal.monitor.config import MetricsConfig
from shoal.net import Identity
from shoal.net.runtime import check_bindable
from shoal.state.checkpoint import LoadedCheckpoint, load_latest_valid
from shoal.state.recovery import Recovered, Source, recover
from shoal.state.sync_client import SyncConfig, find_donors
from shoal.train.config import TrainConfig, with_overrides
from shoal.train.diloco import RoundReport
from shoal.train.run_dir import claim_run_dir
from shoal.train.run_state import checkpoint_root
from shoal.train.swarm_config import PeerOptions
from shoal.train.swarm_services import PeerServices, bytes_by_service, bytes_sent
from shoal.train.swarm_state import (
    AppliedRounds,
    Restored,
    drop_stale_local,
    keep_own_local,
    restore_peer,
    snapshot_peer,
)
from shoal.train.swarm_strategy import Strategy
from shoal.train.trainer import Trainer

__all__ = ["build_trainer", "data_seed", "run_peer"]

log = logging.getLogger(__name__)

Emit = Callable[..., None]


def data_seed(opts: PeerOptions, peer_raw: bytes) -> int:
    """The seed of this peer's batch stream: the shard's seed, or one derived from its id."""
    if opts.shard_index is not None:
        return opts.seed
    return int.from_bytes(hashlib.blake2b(peer_raw, digest_size=4).digest(), "little")


def train_config(opts: PeerOptions) -> TrainConfig:
    """The local trainer's config; raises ``ConfigError`` on a bad model or data setting,
    which ``run_peer`` checks before it opens any port."""
    overrides: dict[str, Any] = {
        **opts.model_config_overrides(),
        "data.dir": opts.data_dir,
        "data.seq_len": opts.seq_len,
        "data.batch_size": opts.batch_size,
        "data.eval_batches": opts.eval_batches,
        "data.shard_index": opts.shard_index or 0,
        "data.num_shards": opts.num_shards if opts.shard_index is not None else 1,
        "optim.lr": opts.lr,
        "schedule.warmup_steps": opts.warmup_steps,
        "run.steps": opts.steps,
        "run.seed": opts.seed,
        "run.run_dir": str(opts.run_dir),
        "run.threads": opts.threads,
        "run.device": "cpu",
        "checkpoint.every_steps": 0,
    }
    return with_overrides(TrainConfig(), overrides)


def build_trainer(opts: PeerOptions, seed_for_data: int) -> Trainer:
    trainer = Trainer(train_config(opts), show_progress=False, log_lines=False)
    if seed_for_data != opts.seed:
        w = trainer.windows
        trainer.windows = TrainWindows(
            w.data,
            seq_len=w.seq_len,
            batch_size=w.batch_size,
            seed=seed_for_data,
            shard_index=w.shard_index,
            num_shards=w.num_shards,
        )
    return trainer


def _dht_if_ahead(services: PeerServices) -> Any:
    """The DHT for recovery, or None when the swarm only announces its initial state
    (every peer builds that from the shared seed: nothing to download)."""
    try:
        choice = services.runtime.run(
            find_donors(services.dht, services.state_key, SyncConfig(dht_timeout_s=10.0)),
            timeout_s=12.0,
        )
    except (NetworkError, TimeoutError) as exc:
        log.warning("could not read state announcements: %s", exc)
        return None
    return services.dht if choice is not None and choice.step > 0 else None


def _make_strategy(
    opts: PeerOptions, trainer: Trainer, services: PeerServices, stop: threading.Event
) -> Strategy:
    if opts.mode == "diloco":
        from shoal.train.diloco_strategy import DiLoCoStrategy

        return DiLoCoStrategy(trainer, services, opts, stop)
    if opts.mode == "streaming":
        from shoal.train.diloco_streaming_strategy import StreamingStrategy

        return StreamingStrategy(trainer, services, opts, stop)
    from shoal.train.collaborative_strategy import SyncStrategy

    return SyncStrategy(trainer, services, opts, stop)


def _load_strategy(strategy: Strategy, restored: Restored, source: Source) -> None:
    """Give ``strategy`` the restored state. From a donor's snapshot the model starts at
    the outer parameters: the donor served its model as trained, with local progress the
    donor sends in its own next round (after a round that left it out, and in streaming
    for every fragment not synced just then)."""
    if not strategy.load_state(restored.strategy, restored.round_index, restored.applied_step):
        # Checked in _restore: training on a half restore is worse.
        raise CheckpointError(
            f"the {source.value} state of step {restored.step} does not fit this peer"
        )
    if source is Source.SWARM:
        strategy.start_from_outer()


def _restore(
    found: Recovered,
    opts: PeerOptions,
    trainer: Trainer,
    shape: dict[str, Any],
    data_seed: int,
    fits: Callable[[dict[str, Any]], str | None] | None = None,
) -> tuple[Source, Restored | None]:
    """Continue from what recovery found. A swarm snapshot that does not fit (another
    model, or outer state the strategy refuses: ``fits`` says why, checked before anything
    is loaded) falls back to our own checkpoint; our own checkpoint that does not fit stops
    the peer with an error, since starting over in that run dir would rotate it away."""

    def candidates() -> Iterator[tuple[Source, LoadedCheckpoint]]:
        if found.checkpoint is not None:
            yield found.source, found.checkpoint
        if found.source is Source.SWARM:  # read from disk only if the swarm's did not fit
            local = load_latest_valid(checkpoint_root(opts.run_dir))
            if local is not None:
                yield Source.DISK, local

    for source, ckpt in candidates():
        try:
            return source, restore_peer(
                ckpt,
                trainer.model,
                trainer.optimizer,
                trainer.windows,
                mode=opts.mode,
                model_shape=shape,
                data_seed=data_seed,
                check=fits,
            )
        except CheckpointError as exc:
            if source is Source.DISK:
                raise ConfigError(
                    f"{opts.run_dir} holds a checkpoint this peer cannot continue from "
                    f"({exc}); give another --run-dir, or remove {ckpt.path}"
                ) from exc
            log.warning("cannot continue from the swarm's snapshot: %s", exc)
    return Source.NONE, None


def run_peer(opts: PeerOptions, stop: threading.Event, emit: Emit) -> int:
    """Run the peer until ``opts.steps`` or ``stop``; returns the process exit code."""
    with claim_run_dir(opts.run_dir):  # one peer per run dir: it holds the identity key
        return _run_claimed(opts, stop, emit)


def _run_claimed(opts: PeerOptions, stop: threading.Event, emit: Emit) -> int:
    train_config(opts)  # refuse a bad model or data setting before listening
    if opts.metrics_port:  # and a metrics port that is taken
        check_bindable(MetricsConfig().host, opts.metrics_port, setting="metrics_port")
    identity = Identity.load_or_create(opts.run_dir / "key")
    services = PeerServices.start(opts, identity, emit)
    opts = services.opts  # the reachability check may have turned client mode on
    strategy: Strategy | None = None
    try:
        seed_for_data = data_seed(opts, services.runtime.peer_id.raw)
        trainer = build_trainer(opts, seed_for_data)
        shape = trainer.model_cfg.to_dict()
        root = checkpoint_root(opts.run_dir)
        found = recover(root, services.runtime, _dht_if_ahead(services), services.state_key)
        # Built first: it says whether a snapshot's outer state fits, before the snapshot
        # is restored (a model restored with outer state left behind is a half restore).
        strategy = _make_strategy(opts, trainer, services, stop)
        source, restored = _restore(
            found, opts, trainer, shape, seed_for_data, fits=strategy.state_misfit
        )
        if found.source is Source.SWARM and source is not Source.SWARM:
            # Its resyncs look elsewhere. Some reasons to refuse a whole restore (its AdamW
            # state) would not refuse the outer state alone; skipping that one version costs
            # little: every new snapshot of its donor is a version of its own.
            services.refused.add(found.swarm_version)
        if restored is None and found.checkpoint is not None:
            # Nothing fit, and a refused snapshot may have reached the model: start afresh.
            strategy.close()
            trainer = build_trainer(opts, seed_for_data)
            strategy = _make_strategy(opts, trainer, services, stop)
        applied_rounds = AppliedRounds(opts.run_dir, found.own_meta)
        noted = applied_rounds.noted
        if restored is not None:
            trainer.step = restored.step
            if source is Source.SWARM:  # our own state stays ours (see keep_own_local)
                restored = keep_own_local(
                    restored,
                    found.own_local,
                    found.own_meta,
                    mode=opts.mode,
                    model_shape=shape,
                    noted_count=noted,
                )
            else:
                restored = drop_stale_local(restored, noted)
            _load_strategy(strategy, restored, source)
        emit(
            "recovered",
            source=source.value,
            step=trainer.step,
            round=strategy.round_index,
        )
        s = strategy

        def provider(averaged: bool = True) -> Any:
            return snapshot_peer(
                trainer.step,
                trainer.model,
                trainer.optimizer,
                trainer.windows,
                strategy=s.state_tensors(),
                round_index=s.round_index,
                mode=opts.mode,
                model_shape=shape,
                data_seed=seed_for_data,
                averaged=averaged,
                applied_step=s.applied_step,
                progress=s.progress,
                progress_tag=s.progress_tag,
                applied_rounds=applied_rounds.count,
            )

        def on_saved(saved: Any) -> None:
            path = str(saved.path) if saved.path else None
            services.monitor.record_checkpoint(saved.step, path=path)
            if path:
                emit("checkpoint", step=saved.step, path=path)

        def on_error(step: int, exc: BaseException) -> None:  # e.g. the disk is full
            emit("checkpoint_failed", step=step, error=f"{type(exc).__name__}: {exc}")

        services.attach_state(root, on_saved, on_error)
        assert services.ckpt is not None  # attach_state sets it
        if restored is None or restored.averaged:  # local progress is not for others
            services.ckpt.save(trainer.step, provider, write=found.source is not Source.DISK)
        emit("ready", step=trainer.step, address=services.runtime.address)
        _loop(opts, trainer, strategy, services, stop, emit, provider, applied_rounds)
        val = trainer.evaluate()
        services.monitor.record_validation(trainer.step, val)
        services.ckpt.flush(timeout_s=30.0)  # its `checkpoint` line before `stopped`
        emit(
            "stopped",
            step=trainer.step,
            round=strategy.round_index,
            val_bpb=round(val, 5),
            bytes_sent=bytes_sent(services.runtime),
            bytes_by_service=bytes_by_service(services.runtime),
        )
        return 0
    finally:
        if strategy is not None:
            strategy.close()
        services.close()


def _loop(
    opts: PeerOptions,
    trainer: Trainer,
    strategy: Strategy,
    services: PeerServices,
    stop: threading.Event,
    emit: Emit,
    provider: Callable[..., Any],
    applied_rounds: AppliedRounds,
) -> None:
    monitor = services.monitor
    ckpt = services.ckpt
    assert ckpt is not None
    applied = attempts = calls = 0
    losses: list[float] = []
    every = opts.checkpoint_every_rounds

    unwritten = False  # an applied round's snapshot was served but not written

    def keep_local_progress(*, stopping: bool = False) -> None:
        """Write (not serve) what the swarm has not averaged yet, if anything is new; when
        stopping, also the last applied round's state if only served (its own state, such
        as error feedback, then survives a restart)."""
        nonlocal unwritten
        if not every:
            return
        if trainer.step != ckpt.last_taken_step:
            ckpt.save(trainer.step, lambda: provider(False), write=True, serve=False)
            unwritten = False
        elif stopping and unwritten:  # the state the swarm agreed on: served as well
            ckpt.save(trainer.step, provider, write=True)
            unwritten = False

    def after_round(r: RoundReport) -> None:
        nonlocal applied, attempts, unwritten
        attempts += 1
        if r.ok:
            monitor.record_round(opts.mode, sum(r.seconds.values()), group_size=r.group_size)
        else:
            monitor.record_failure(opts.mode, error=r.reason)
        emit(
            "round",
            round=r.round_index,
            ok=r.ok,
            step=trainer.step,
            contributors=r.contributors,
            group=r.group_size,
            weight=r.weight,
            reason=r.reason,
            resynced=r.resynced,
            fingerprint=strategy.fingerprint(),
            seconds={k: round(v, 3) for k, v in r.seconds.items()},
            bytes_sent=bytes_sent(services.runtime),
        )
        if not r.ok:
            if every and attempts % every == 0:
                keep_local_progress()
            return
        applied += 1
        applied_rounds.applied()  # noted before the round's snapshot is taken
        write = bool(every) and applied % every == 0
        ckpt.save(trainer.step, provider, write=write)
        unwritten = not write
        if opts.eval_every_rounds and applied % opts.eval_every_rounds == 0:
            t0 = time.monotonic()
            val = trainer.evaluate()
            monitor.record_validation(trainer.step, val)
            emit("eval", step=trainer.step, val_bpb=round(val, 5), seconds=time.monotonic() - t0)

    while trainer.step < opts.steps and not stop.is_set():
        monitor.begin_step(trainer.step)
        out = strategy.step()
        calls += 1
        losses.append(out.loss)
        monitor.end_step(loss=out.loss, samples=out.samples, tokens=out.samples * opts.seq_len)
        for report in out.reports:  # before the step line: it shows the rounds' results
            after_round(report)
        if calls % opts.report_every == 0:
            mean = sum(losses) / len(losses)
            losses.clear()
            emit(
                "step",
                step=trainer.step,
                loss=round(mean, 5),
                peers=services.trainers(),
                round=strategy.round_index,
            )
    keep_local_progress(stopping=True)  # the steps since the last round, for a restart
