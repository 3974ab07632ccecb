"""The process side of ``shoal peer``: signals, progress lines, dispatch by role."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["Printer", "run_stage", "run_trainer"]


class Printer:
    """Progress lines on stdout: JSON objects (``--json``) or ``event key=value`` text."""

    def __init__(self, json_lines: bool) -> None:
        self.json_lines = json_lines
        self._lock = threading.Lock()

    def __call__(self, event: str, **fields: Any) -> None:
        if self.json_lines:
            line = json.dumps({"event": event, **fields}, default=str)
        else:
            line = " ".join([f"{event:<10}"] + [f"{k}={v}" for k, v in fields.items()])
        with self._lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():  # a second signal: leave now
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def run_trainer(opts: Any) -> int:
    from shoal.train.swarm_peer import run_peer

    stop = _stop_on_signals()
    return run_peer(opts, stop, Printer(opts.json))


def run_stage(
    *,
    stage: str,
    tp: int,
    join: list[str],
    port: int,
    host: str,
    run_dir: Path,
    swarm_key: bytes,
    model: str,
) -> int:
    """Serve one pipeline stage (``--tp N``: tensor-parallel inside the stage)."""
    from shoal.net import NetConfig
    from shoal.parallel.pipeline.entry import serve_stage

    factory: Any = None
    if tp < 1:
        sys.stderr.write(f"shoal peer: --tp must be >= 1, got {tp}\n")
        return 2
    if tp > 1:
        # This process is rank 0 and speaks to the swarm; it spawns tp - 1 follower ranks
        # (torch.distributed needs a process per rank) that die with it.
        from functools import partial

        from shoal.parallel.tensor.pipeline_server import TPStageServer

        factory = partial(TPStageServer, tp=tp)
    stop = _stop_on_signals()
    printer = Printer(True)
    run_dir.mkdir(parents=True, exist_ok=True)
    which: int | str = int(stage) if stage.isdigit() else "auto"
    serve_stage(
        stage=which,
        model=model,
        join=join,
        net=NetConfig(host=host, port=port, swarm_key=swarm_key),
        key_path=run_dir / "key",
        stop=stop,
        ready=lambda server: printer(
            "listening",
            address=str(server.runtime.address),
            stage=str(getattr(server, "stage", which)),
            tp=str(tp),
        ),
        **({"server_factory": factory} if factory is not None else {}),
    )
    printer("stopped")
    return 0
