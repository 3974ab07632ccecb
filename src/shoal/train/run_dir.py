"""A peer's run directory: created with clear errors, and held by one process at a time.

Two peers started in one run dir share its key, so they get the same PeerID, draw the same
data and never average (each sees only itself); and they would write into the same
checkpoints. ``claim_run_dir`` takes an exclusive ``flock`` on ``<run dir>/lock`` for as
long as the peer runs; the kernel drops it when the process ends, however it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from shoal.errors import ConfigError

__all__ = ["claim_run_dir"]


@contextlib.contextmanager
def claim_run_dir(run_dir: Path) -> Iterator[Path]:
    """Create ``run_dir`` if needed and hold it; ConfigError if unusable or in use."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / "lock", "a+")  # noqa: SIM115 - held until the peer ends
    except (FileExistsError, NotADirectoryError) as exc:
        raise ConfigError(f"--run-dir {run_dir}: not a directory ({exc.strerror})") from exc
    except OSError as exc:
        raise ConfigError(f"--run-dir {run_dir}: cannot use it ({exc.strerror})") from exc
    with lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise ConfigError(
                f"--run-dir {run_dir} is in use by pid {holder}: give each peer its own"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield run_dir
