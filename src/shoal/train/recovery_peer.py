"""A training peer with background checkpoints, a State service and DHT announcements.

    python -m shoal.train.recovery_peer --run-dir runs/a [--join HOST:PORT] [--interval 20]

The recovery tests kill it with ``kill -9`` and restart it: a training peer reduced to the
state machinery (no averaging), so recovery is tested on its own; ``shoal peer`` composes
the same pieces with data parallelism. Startup: identity from ``<run-dir>/key`` (the same
PeerID across restarts), network runtime, DHT (bootstrapped from ``--join``), the local
``Trainer`` on the tiny model, then ``recover`` (disk or swarm, whichever is fresher) and
restore. Then it steps forever (or to ``--steps``), snapshotting every ``--interval`` steps
in the background, serving the newest snapshot and announcing it.

Stdout carries one JSON object per line for whoever drives the process:
``listening``, ``recovered`` (source, step), ``ready``, ``checkpoint`` (step, path),
``step`` (every ``--report-every`` steps) and ``stopped``. Logs go to stderr; recovery and
checkpoint events also go to the peer's event log ``<run-dir>/events.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["main"]

log = logging.getLogger("shoal.train.recovery_peer")
_emit_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    with _emit_lock:
        print(json.dumps({"event": event, **fields}), flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shoal.train.recovery_peer")
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--join", action="append", default=[], help="DHT bootstrap HOST:PORT")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--swarm", default="demo")
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--interval", type=int, default=20, help="checkpoint every N steps")
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--report-every", type=int, default=5)
    p.add_argument("--data-dir", default=None, help="text files (default: embedded corpus)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttl", type=float, default=30.0, help="announcement TTL in s")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    from shoal.dht.peer import DHT
    from shoal.errors import CheckpointError, ShoalError
    from shoal.monitor.config import EventLogConfig, MonitorConfig
    from shoal.monitor.peer import PeerMonitor
    from shoal.net import Identity, NetConfig, NetRuntime
    from shoal.net.config import RetryPolicy
    from shoal.state.announce import StateAnnouncer, state_key
    from shoal.state.background import BackgroundCheckpointer, CheckpointerConfig, SavedCheckpoint
    from shoal.state.checkpoint import load_latest_valid
    from shoal.state.recovery import Source, recover
    from shoal.state.sync_service import StateServer
    from shoal.train.config import TrainConfig, with_overrides
    from shoal.train.run_state import checkpoint_root, restore_run, snapshot_run
    from shoal.train.trainer import Trainer

    join_policy = RetryPolicy(initial_s=0.5, max_s=4.0, attempts=12, deadline_s=60.0)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    identity = Identity.load_or_create(run_dir / "key")
    runtime = NetRuntime(identity, NetConfig(port=args.port)).start()
    dht = DHT(runtime)
    key = state_key(args.swarm)
    monitor = PeerMonitor(
        MonitorConfig(events=EventLogConfig(path=run_dir / "events.jsonl")),
        peer=runtime.peer_id.to_string(),
    )
    monitor.start()
    emit("listening", address=runtime.address, peer_id=runtime.peer_id.to_string())
    if args.join:
        try:
            dht.bootstrap(args.join, join_policy)
        except ShoalError as exc:  # alone for now: recover from disk, others may find us later
            log.warning("could not join the DHT via %s: %s", args.join, exc)

    cfg = with_overrides(
        TrainConfig(),
        {
            "model.name": "tiny",
            "model.n_layer": 1,
            "model.d_model": 32,
            "model.n_head": 2,
            "data.dir": args.data_dir,
            "data.seq_len": 32,
            "data.batch_size": 4,
            "run.steps": args.steps,
            "run.seed": args.seed,
            "run.run_dir": str(run_dir),
            "run.threads": 1,
            "run.device": "cpu",
            "checkpoint.every_steps": 0,
        },
    )
    trainer = Trainer(cfg, show_progress=False, log_lines=False)
    config_meta = {**cfg.to_dict(), "model_shape": trainer.model_cfg.to_dict()}
    root = checkpoint_root(run_dir)
    found = recover(root, runtime, dht, key)
    source = found.source
    try:
        if found.checkpoint is not None:
            trainer.step = restore_run(
                found.checkpoint, trainer.model, trainer.optimizer, trainer.windows, config_meta
            )
    except CheckpointError as exc:
        if source is not Source.SWARM:
            raise
        # A donor's snapshot that does not fit costs the download, not the peer: continue
        # from the disk copy, on a fresh trainer (the refused snapshot may have reached it).
        log.warning("cannot continue from the swarm's snapshot: %s", exc)
        trainer = Trainer(cfg, show_progress=False, log_lines=False)
        local = load_latest_valid(root)
        source = Source.DISK if local is not None else Source.NONE
        if local is not None:
            trainer.step = restore_run(
                local, trainer.model, trainer.optimizer, trainer.windows, config_meta
            )
    monitor.events.emit(
        "recovery", source=source.value, step=trainer.step, swarm_step=found.swarm_step
    )
    emit(
        "recovered",
        source=source.value,
        step=trainer.step,
        local_step=found.local_step,
        swarm_step=found.swarm_step,
    )

    def provider() -> Any:
        return snapshot_run(
            trainer.step, trainer.model, trainer.optimizer, trainer.windows, config_meta
        )

    announcer: StateAnnouncer | None = None

    def on_saved(saved: SavedCheckpoint) -> None:
        path = str(saved.path) if saved.path else None
        monitor.record_checkpoint(saved.step, path=path, write_s=round(saved.write_s, 4))
        emit("checkpoint", step=saved.step, path=path)
        if announcer is not None:
            announcer.notify()

    ckpt = BackgroundCheckpointer(
        root,
        CheckpointerConfig(interval_steps=args.interval, keep_last=args.keep_last),
        on_saved=on_saved,
    )
    server = StateServer(runtime, ckpt.latest_served)
    announcer = StateAnnouncer(
        dht, key, ckpt.latest_served, address=runtime.address, ttl_s=args.ttl
    ).start()
    ckpt.save(trainer.step, provider, write=source is not Source.DISK)
    emit("ready", step=trainer.step, address=runtime.address)
    try:
        while trainer.step < args.steps and not stop.is_set():
            trainer.train_step()
            if trainer.step % args.report_every == 0:
                emit("step", step=trainer.step)
            ckpt.maybe_save(trainer.step, provider)
        if ckpt.last_taken_step != trainer.step:
            ckpt.save(trainer.step, provider)
    finally:
        ckpt.close(timeout_s=30.0)
        announcer.close()
        server.close()
        dht.close()
        runtime.close()
        monitor.close()
    emit("stopped", step=trainer.step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
