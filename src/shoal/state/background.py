"""Background checkpoints: snapshot between steps on the compute thread, write on a worker.

    ckpt = BackgroundCheckpointer(run_dir / "checkpoints", CheckpointerConfig(interval_steps=50))
    for step in ...:
        train_step()
        ckpt.maybe_save(step, lambda: snapshot_run(step, model, optimizer, windows, cfg))
    ckpt.close()

The compute thread only pays for the CPU copy (``state_provider()``); indexing the copy for
serving (``snapshot.prepare``) and writing it (``checkpoint.write_snapshot``: temporary
folder, fsync, atomic rename, manifest with sha256 per file, last K kept) run on one worker
thread. One write is in flight at a time; a snapshot queued behind it is replaced by a newer
one (counted in ``superseded``), except that one only to be written (``serve=False``: state
the swarm has not agreed on) never replaces one queued to be served: both then go, the
older one served and the newer one written. ``latest_served()`` is the newest snapshot
indexed for serving: immutable CPU tensors a ``StateServer`` can stream while training
goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import ConfigError
from shoal.net.config import MiB
from shoal.state.checkpoint import Snapshot, write_snapshot
from shoal.state.snapshot import ServedSnapshot, prepare

__all__ = ["BackgroundCheckpointer", "CheckpointerConfig", "SavedCheckpoint"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointerConfig:
    """How often and how a run is checkpointed in the background."""

    interval_steps: int = 100
    """``maybe_save`` snapshots when the step is a multiple of this (0 = only ``save``)."""
    keep_last: int = 3
    """Published checkpoints kept on disk."""
    write_to_disk: bool = True
    """False: only index snapshots for serving (a donor without a run folder)."""
    serve: bool = True
    """Index each snapshot for serving (``latest_served``)."""
    chunk_bytes: int = MiB
    """Checksum granularity of served snapshots."""

    def __post_init__(self) -> None:
        if not isinstance(self.interval_steps, int) or self.interval_steps < 0:
            raise ConfigError(
                f"CheckpointerConfig.interval_steps must be an int >= 0, got {self.interval_steps!r}"
            )
        if not isinstance(self.keep_last, int) or self.keep_last < 1:
            raise ConfigError(
                f"CheckpointerConfig.keep_last must be an int >= 1, got {self.keep_last!r}"
            )
        if not 0 < self.chunk_bytes <= MiB:
            raise ConfigError(
                f"CheckpointerConfig.chunk_bytes must be in (0, 1 MiB], got {self.chunk_bytes!r}"
            )


@dataclass(frozen=True, slots=True)
class SavedCheckpoint:
    """What the worker reports after each snapshot it handled."""

    step: int
    path: Path | None
    """The published folder (None when not written to disk)."""
    write_s: float
    """Worker time: indexing plus writing."""


class BackgroundCheckpointer:
    """Snapshots taken on the caller's thread, indexed and written on one worker thread."""

    def __init__(
        self,
        root: str | Path,
        config: CheckpointerConfig | None = None,
        *,
        on_saved: Callable[[SavedCheckpoint], None] | None = None,
        on_error: Callable[[int, BaseException], None] | None = None,
    ) -> None:
        self.root = Path(root)
        self.config = config or CheckpointerConfig()
        self.on_saved = on_saved
        self.on_error = on_error
        """Called on the worker thread with the step and the error of a failed save."""
        self.superseded = 0
        self.pauses_s: list[float] = []
        self.last_saved: SavedCheckpoint | None = None
        self.last_error: BaseException | None = None
        self._latest_served: ServedSnapshot | None = None
        self._last_taken_step: int | None = None
        self._to_serve: Snapshot | None = None
        """The next snapshot to index for serving (may be ``_to_write`` too)."""
        self._to_write: Snapshot | None = None
        """The next snapshot to write to disk."""
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="shoal-checkpoint", daemon=True)
        self._thread.start()

    # -- compute thread ----------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Whether ``maybe_save(step, ...)`` would take a snapshot."""
        every = self.config.interval_steps
        return bool(every) and step % every == 0 and step != self._last_taken_step

    def maybe_save(self, step: int, state_provider: Callable[[], Snapshot]) -> bool:
        """Snapshot and queue when ``step`` is due; returns whether it did."""
        if not self.due(step):
            return False
        self.save(step, state_provider)
        return True

    def save(
        self,
        step: int,
        state_provider: Callable[[], Snapshot],
        *,
        write: bool = True,
        serve: bool = True,
    ) -> float:
        """Snapshot now (``state_provider`` runs here) and queue it; returns the pause in s.

        ``write=False`` only makes it servable (e.g. the state just restored from disk);
        ``serve=False`` only writes it (state the swarm has not agreed on, such as local
        progress since the last applied round: a restart continues from it, a joiner
        should not).
        """
        if self._closed:
            raise RuntimeError("checkpointer is closed")
        start = time.perf_counter()
        snapshot = state_provider()
        pause = time.perf_counter() - start
        self.pauses_s.append(pause)
        self._last_taken_step = step
        self.submit(snapshot, write=write, serve=serve)
        return pause

    def submit(self, snapshot: Snapshot, *, write: bool = True, serve: bool = True) -> None:
        """Queue an already taken snapshot (replaces one still waiting)."""
        with self._cond:
            queued = [s for s in (self._to_serve, self._to_write) if s is not None]
            if serve:
                self._to_serve = snapshot
            # A disk write still owed goes with a newer snapshot to serve: replacing a
            # queued write by a serve-only snapshot lost the every-N-rounds checkpoint.
            if write or (serve and self._to_write is not None):
                self._to_write = snapshot
            for old in {id(s): s for s in queued}.values():
                if old is not self._to_serve and old is not self._to_write:
                    self.superseded += 1
                    log.info(
                        "checkpoint of step %d superseded by step %d before it was written",
                        old.step,
                        snapshot.step,
                    )
            self._cond.notify_all()

    @property
    def last_taken_step(self) -> int | None:
        """Step of the newest snapshot taken (queued, written or not)."""
        return self._last_taken_step

    def latest_served(self) -> ServedSnapshot | None:
        """The newest snapshot indexed for serving (immutable), or None; a snapshot provider."""
        return self._latest_served

    def flush(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or being written; False if ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._to_serve is not None or self._to_write is not None or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout_s: float = 30.0) -> bool:
        """Finish the queued write (up to ``timeout_s``) and stop the worker. Idempotent."""
        flushed = self.flush(timeout_s) if not self._closed else True
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(max(0.1, timeout_s))
        return flushed

    def __enter__(self) -> BackgroundCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- worker thread -----------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while self._to_serve is None and self._to_write is None and not self._closed:
                    self._cond.wait()
                to_serve, to_write = self._to_serve, self._to_write
                if to_serve is None and to_write is None:
                    return
                self._to_serve = self._to_write = None
                self._busy = True
            step = _step_of(to_serve, to_write)
            try:
                self._handle(to_serve, to_write)
            except Exception as exc:  # a failed write must not kill the worker
                self.last_error = exc
                log.exception("background checkpoint of step %d failed", step)
                if self.on_error is not None:
                    self.on_error(step, exc)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _handle(self, to_serve: Snapshot | None, to_write: Snapshot | None) -> None:
        cfg = self.config
        start = time.perf_counter()
        if cfg.serve and to_serve is not None:
            self._latest_served = prepare(to_serve, chunk_bytes=cfg.chunk_bytes)
        path = None
        if cfg.write_to_disk and to_write is not None:
            path = write_snapshot(to_write, self.root, keep_last=cfg.keep_last)
        saved = SavedCheckpoint(_step_of(to_serve, to_write), path, time.perf_counter() - start)
        self.last_saved = saved
        log.info(
            "checkpoint of step %d %s in %.3f s",
            saved.step,
            f"written to {path}" if path else "ready to serve",
            saved.write_s,
        )
        if self.on_saved is not None:
            self.on_saved(saved)


def _step_of(to_serve: Snapshot | None, to_write: Snapshot | None) -> int:
    """The step a handled pair reports: the written snapshot's, else the served one's."""
    snapshot = to_write if to_write is not None else to_serve
    assert snapshot is not None
    return snapshot.step
