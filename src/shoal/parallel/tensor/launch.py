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

import contextlib
import ctypes
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import Store, TCPStore  # type: ignore[attr-defined]

from shoal.errors import ConfigError, ShoalError
from shoal.parallel.tensor.comm import TPComm
from shoal.parallel.tensor.config import LaunchConfig

__all__ = ["RankContext", "TPGroup", "TPGroupError", "launch_tp_group", "start_tp_group"]

HOST = "127.0.0.1"


class TPGroupError(ShoalError):
    """A rank of a local tensor-parallel group failed, died, or missed a deadline."""

    def __init__(self, message: str, *, rank: int | None = None) -> None:
        super().__init__(message if rank is None else f"rank {rank}: {message}")
        self.rank = rank


@dataclass(kw_only=True, slots=True)
class RankContext:
    """What a rank's target receives: its place in the group and the group itself."""

    rank: int
    world_size: int
    comm: TPComm
    device: torch.device
    config: LaunchConfig = field(default_factory=LaunchConfig)


def _resolve_backend(backend: str, world_size: int) -> str:
    if backend != "auto":
        if backend == "nccl" and torch.cuda.device_count() < world_size:
            raise ConfigError(f"tp.backend='nccl' needs {world_size} GPUs, found "
                              f"{torch.cuda.device_count()}")
        return backend
    return "nccl" if torch.cuda.device_count() >= world_size else "gloo"


def _init_rank(rank: int, world_size: int, store: Store, cfg: LaunchConfig) -> RankContext:
    backend = _resolve_backend(cfg.backend, world_size)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=cfg.collective_timeout_s),
        device_id=device if backend == "nccl" else None,
    )
    return RankContext(rank=rank, world_size=world_size, comm=TPComm(None), device=device,
                       config=cfg)


def _close_rank() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (and check it is still alive)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    parent_pid: int,
    cfg: LaunchConfig,
    target: Callable[..., Any],
    args: Sequence[Any],
    conn: mpc.Connection,
) -> None:
    _die_with_parent(parent_pid)
    torch.set_num_threads(cfg.threads_per_rank or max(1, (os.cpu_count() or 1) // world_size))
    try:
        store = TCPStore(HOST, port, world_size, is_master=False,
                              timeout=timedelta(seconds=cfg.init_timeout_s))
        ctx = _init_rank(rank, world_size, store, cfg)
        try:
            payload: tuple[str, Any] = ("ok", target(ctx, *args))
        finally:
            _close_rank()
        data = pickle.dumps(payload)
    except BaseException as exc:  # report everything; the launcher decides
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        data = pickle.dumps(("error", text))
    conn.send_bytes(data)
    conn.close()


class _Followers:
    """Spawned ranks and the pipes their results come back on."""

    def __init__(self, ranks: range, world_size: int, port: int, cfg: LaunchConfig,
                 target: Callable[..., Any], args: Sequence[Any]) -> None:
        self.cfg = cfg
        ctx = mp.get_context("spawn")
        self.procs: dict[int, Any] = {}
        self.readers: dict[int, mpc.Connection] = {}
        self.results: dict[int, Any] = {}
        try:
            for rank in ranks:
                reader, writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_rank_main,
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
                    raise TPGroupError(f"exited with code {proc.exitcode} without a result",
                                       rank=rank)
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        return self.results

    def _receive(self, rank: int) -> Any:
        try:
            status, value = pickle.loads(self.readers[rank].recv_bytes(self.cfg.max_result_bytes))
        except (EOFError, OSError) as exc:
            raise TPGroupError(f"result lost or over {self.cfg.max_result_bytes} bytes",
                               rank=rank) from exc
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
    return TCPStore(HOST, 0, world_size, is_master=True,
                         timeout=timedelta(seconds=cfg.init_timeout_s), wait_for_workers=False)


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
    _resolve_backend(cfg.backend, world_size)
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
            _close_rank()
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
    _resolve_backend(cfg.backend, world_size)
    store = _host_store(world_size, cfg)
    followers = _Followers(range(1, world_size), world_size, store.port, cfg, follower, args)
    try:
        ctx = _init_rank(0, world_size, store, cfg)
    except BaseException as exc:
        followers.terminate()
        _close_rank()
        raise TPGroupError(f"group of {world_size} did not form: {exc}", rank=0) from exc
    return TPGroup(ctx, followers, store)
