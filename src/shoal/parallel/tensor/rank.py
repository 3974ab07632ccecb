"""One rank of a local tensor-parallel group: its context, process-group setup, entry point.

``rank_main`` is what every spawned rank runs: arrange to die with the launcher, connect to the
launcher's ``TCPStore``, join the process group, run the target, send back its result (or the
traceback) as one pickled message, leave the group. ``launch.py`` starts and supervises ranks.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing.connection as mpc
import os
import pickle
import signal
import sys
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

__all__ = [
    "HOST",
    "RankContext",
    "TPGroupError",
    "close_rank",
    "init_rank",
    "rank_main",
    "resolve_backend",
]

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


def resolve_backend(backend: str, world_size: int) -> str:
    if backend != "auto":
        if backend == "nccl" and torch.cuda.device_count() < world_size:
            raise ConfigError(
                f"tp.backend='nccl' needs {world_size} GPUs, found {torch.cuda.device_count()}"
            )
        return backend
    return "nccl" if torch.cuda.device_count() >= world_size else "gloo"


def init_rank(rank: int, world_size: int, store: Store, cfg: LaunchConfig) -> RankContext:
    backend = resolve_backend(cfg.backend, world_size)
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
    return RankContext(
        rank=rank, world_size=world_size, comm=TPComm(None), device=device, config=cfg
    )


def close_rank() -> None:
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


def rank_main(
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
        store = TCPStore(
            HOST, port, world_size, is_master=False, timeout=timedelta(seconds=cfg.init_timeout_s)
        )
        ctx = init_rank(rank, world_size, store, cfg)
        try:
            payload: tuple[str, Any] = ("ok", target(ctx, *args))
        finally:
            close_rank()
        data = pickle.dumps(payload)
    except BaseException as exc:  # report everything; the launcher decides
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        data = pickle.dumps(("error", text))
    conn.send_bytes(data)
    conn.close()
