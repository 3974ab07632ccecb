"""Configuration of a local tensor-parallel group: backend, timeouts, threads."""

from __future__ import annotations

from dataclasses import dataclass

from shoal.errors import ConfigError

__all__ = ["LaunchConfig"]

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(kw_only=True, slots=True)
class LaunchConfig:
    """How ``launch_tp_group`` / ``start_tp_group`` start and supervise the local ranks."""

    backend: str = "auto"
    """``gloo``, ``nccl``, or ``auto`` (NCCL when CUDA has a GPU per rank, else gloo)."""
    init_timeout_s: float = 60.0
    """Covers a rank's whole start: process spawn, store connection, process-group setup."""
    collective_timeout_s: float = 300.0
    """Longest wait of any one collective; a rank that stops answering fails the group."""
    run_timeout_s: float = 900.0
    """Deadline for ``launch_tp_group`` as a whole (every rank's target must return)."""
    terminate_grace_s: float = 2.0
    """After a deadline or failure: how long SIGTERM gets before SIGKILL, per step."""
    threads_per_rank: int = 0
    """Torch intra-op threads in each rank; 0 splits the CPU cores evenly (at least 1)."""
    max_result_bytes: int = 256 * 1024 * 1024
    """Largest pickled return value a rank may send back to the launcher."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"tp.backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in (
            "init_timeout_s",
            "collective_timeout_s",
            "run_timeout_s",
            "terminate_grace_s",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"tp.{name} must be > 0, got {value!r}")
        if not isinstance(self.threads_per_rank, int) or self.threads_per_rank < 0:
            raise ConfigError(f"tp.threads_per_rank must be >= 0, got {self.threads_per_rank!r}")
        if not isinstance(self.max_result_bytes, int) or self.max_result_bytes < 1:
            raise ConfigError(f"tp.max_result_bytes must be >= 1, got {self.max_result_bytes!r}")
