"""Start the local ranks of a tensor-parallel group, supervise them, tear them down.

``torch.distributed`` needs one OS process per rank. This is the one place where Shoal runs
more than one process per peer: a peer started with ``--tp N`` owns N-1 follower processes
(or N, with ``launch_tp_group``), all on this host, that talk only through the process group
and never touch the network. The rest of Shoal's one-process rule holds for them: they open
no sockets besides the process group's and start no children.

Rendezvous. The launcher hosts the ``TCPStore`` itself on 127.0.0.1 with port 0, so the OS
picks a free port and no port can be taken between choosing and binding it. Ranks connect to
it as clients within ``init_timeout_s``.

Teardown. Every rank is spawned (never forked) as a daemon with ``PR_SET_PDEATHSIG`` =
SIGKILL on Linux, so it dies with the launcher even after ``kill -9``. A rank that fails sends
its traceback back and the launcher terminates the others (SIGTERM, then SIGKILL after
``terminate_grace_s``) and raises ``TPGroupError``; on a deadline the same happens.
Linux delivers the death signal when the *thread* that spawned a rank ends, so start a group
from a thread that lives as long as the group (the main thread of a peer).
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import pickle
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed import TCPStore  # type: ignore[attr-defined]

from shoal.errors import ConfigError
from shoal.parallel.tensor.config import LaunchConfig
from shoal.parallel.tensor.rank import (
    HOST,
    RankContext,
    TPGroupError,
    close_rank,
    init_rank,
    rank_main,
    resolve_backend,
)

__all__ = ["RankContext", "TPGroup", "TPGroupError", "launch_tp_group", "start_tp_group"]


class _Followers:
    """Spawned ranks and the pipes their results come back on."""

    def __init__(
        self,
        ranks: range,
        world_size: int,
        port: int,
        cfg: LaunchConfig,
        target: Callable[..., Any],
        args: Sequence[Any],
    ) -> None:
        self.cfg = cfg
        ctx = mp.get_context("spawn")
        self.procs: dict[int, Any] = {}
        self.readers: dict[int, mpc.Connection] = {}
        self.results: dict[int, Any] = {}
        try:
            for rank in ranks:
                reader, writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=rank_main,
                    args=(rank, world_size, port, os.getpid(), cfg, target, args, writer),
                    name=f"shoal-tp-rank{rank}",
                    daemon=True,
                )
                proc.start()
                writer.close()
                self.procs[rank], self.readers[rank] = proc, reader
        except BaseException:
            self.terminate()
            raise

    def wait(self, deadline: float) -> dict[int, Any]:
        """Collect every rank's result by ``deadline`` (monotonic); raise on any failure."""
        pending = set(self.procs) - set(self.results)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TPGroupError(f"ranks {sorted(pending)} missed the deadline")
            handles = [self.readers[r] for r in pending] + [self.procs[r].sentinel for r in pending]
            ready = mpc.wait(handles, timeout=remaining)
            for rank in sorted(pending):
                reader, proc = self.readers[rank], self.procs[rank]
                if reader in ready or (proc.sentinel in ready and reader.poll(0)):
                    self.results[rank] = self._receive(rank)
                    pending.discard(rank)
                elif proc.sentinel in ready:
                    proc.join(self.cfg.terminate_grace_s)
                    raise TPGroupError(
                        f"exited with code {proc.exitcode} without a result", rank=rank
                    )
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        return self.results

    def _receive(self, rank: int) -> Any:
        try:
            status, value = pickle.loads(self.readers[rank].recv_bytes(self.cfg.max_result_bytes))
        except (EOFError, OSError) as exc:
            raise TPGroupError(
                f"result lost or over {self.cfg.max_result_bytes} bytes", rank=rank
            ) from exc
        if status != "ok":
            raise TPGroupError(f"failed:\n{value}", rank=rank)
        return value

    def terminate(self) -> None:
        """Stop every rank still running (SIGTERM, then SIGKILL); idempotent."""
        alive = [p for p in self.procs.values() if p.is_alive()]
        for proc in alive:
            proc.terminate()
        for proc in alive:
            proc.join(self.cfg.terminate_grace_s)
        for proc in alive:
            if proc.is_alive():
                proc.kill()
                proc.join(self.cfg.terminate_grace_s)
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()


def _host_store(world_size: int, cfg: LaunchConfig) -> TCPStore:
    return TCPStore(
        HOST,
        0,
        world_size,
        is_master=True,
        timeout=timedelta(seconds=cfg.init_timeout_s),
        wait_for_workers=False,
    )


def _check_world(world_size: int) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"tp world_size must be a positive integer, got {world_size!r}")


def launch_tp_group(
    world_size: int,
    target: Callable[..., Any],
    args: Sequence[Any] = (),
    *,
    config: LaunchConfig | None = None,
) -> list[Any]:
    """Run ``target(ctx: RankContext, *args)`` on ``world_size`` fresh local processes.

    ``target`` must be importable (a module-level function) and its return value picklable.
    Blocks until every rank returns, then returns their values in rank order.

    Raises:
        ConfigError: bad ``world_size`` or backend.
        TPGroupError: a rank raised, died or missed ``config.run_timeout_s``; the others
            have been stopped when it is raised.
    """
    _check_world(world_size)
    cfg = config or LaunchConfig()
    resolve_backend(cfg.backend, world_size)
    deadline = time.monotonic() + cfg.run_timeout_s
    store = _host_store(world_size, cfg)
    followers = _Followers(range(world_size), world_size, store.port, cfg, target, args)
    try:
        results = followers.wait(deadline)
    finally:
        followers.terminate()
        del store
    return [results[r] for r in range(world_size)]


class TPGroup:
    """A group whose rank 0 is this process and whose other ranks are spawned followers."""

    def __init__(self, ctx: RankContext, followers: _Followers, store: TCPStore) -> None:
        self.ctx = ctx
        self._followers = followers
        self._store: TCPStore | None = store
        self._closed = False

    def __enter__(self) -> TPGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout_s: float | None = None) -> list[Any]:
        """Wait for the followers to return (after they were told to stop), then tear down.

        Returns the followers' results in rank order (ranks 1..N-1); idempotent (a second
        call returns ``[]``). Followers still running after ``timeout_s`` are killed.

        Raises:
            TPGroupError: a follower failed or missed the deadline.
        """
        if self._closed:
            return []
        self._closed = True
        wait_s = timeout_s if timeout_s is not None else self.ctx.config.terminate_grace_s * 5
        try:
            results = self._followers.wait(time.monotonic() + wait_s)
        finally:
            self._followers.terminate()
            close_rank()
            self._store = None
        return [results[r] for r in sorted(results)]


def start_tp_group(
    world_size: int,
    follower: Callable[..., Any],
    args: Sequence[Any] = (),
    *,
    config: LaunchConfig | None = None,
) -> TPGroup:
    """Make this process rank 0 and spawn ranks 1..N-1 running ``follower(ctx, *args)``.

    This is how a peer with ``--tp N`` starts: it keeps talking to the swarm as rank 0 and
    drives the followers (see ``runner.py``). Only one group per process (it uses torch's
    default process group).

    Raises:
        ConfigError: bad ``world_size`` or backend, or a default group already exists.
        TPGroupError: the group did not form within ``config.init_timeout_s``.
    """
    _check_world(world_size)
    cfg = config or LaunchConfig()
    if dist.is_initialized():
        raise ConfigError("a torch.distributed default group already exists in this process")
    resolve_backend(cfg.backend, world_size)
    store = _host_store(world_size, cfg)
    followers = _Followers(range(1, world_size), world_size, store.port, cfg, follower, args)
    try:
        ctx = init_rank(0, world_size, store, cfg)
    except BaseException as exc:
        followers.terminate()
        close_rank()
        raise TPGroupError(f"group of {world_size} did not form: {exc}", rank=0) from exc
    return TPGroup(ctx, followers, store)
