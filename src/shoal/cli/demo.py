"""`shoal demo`: watch a local swarm train, lose a peer to SIGKILL and get it back.

    shoal demo                 # 4 peers + bootstrap on loopback, shaped links, ~2 minutes
    shoal demo --json          # the summary as one JSON line on stdout
    shoal demo --local         # the single-process run (no swarm)

The scenario lives in ``_demo_swarm``; progress on a terminal is a live table, otherwise
plain lines (on stderr with ``--json``). Every child process is terminated on exit, on
Ctrl-C and on error. Exit codes: 0 done, 2 a step missed its deadline or a peer failed,
130 interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import typer

__all__ = ["register"]

# Sleeping (not spinning) OpenMP waits; see shoal.cli.train. Must precede any torch import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON line."),
        run_dir: Path = typer.Option(None, "--run-dir", help="Logs, keys, checkpoints."),  # noqa: B008
        peers: int = typer.Option(4, "--peers", help="Training peers."),
        steps: int = typer.Option(None, "--steps", help="Local steps per peer (100; --local 300)."),
        local_steps: int = typer.Option(10, "--local-steps", "-H", help="DiLoCo H."),
        mode: str = typer.Option("diloco", "--mode", help="diloco | streaming | sync"),
        rate_mbit: float = typer.Option(100.0, "--rate-mbit", help="Each peer link's cap."),
        delay_ms: float = typer.Option(25.0, "--delay-ms", help="One-way latency per link."),
        deadline_s: float = typer.Option(
            None, "--deadline", help="Whole-run deadline, s (170, plus 2 per round past 10)."
        ),
        monitor: bool = typer.Option(True, "--monitor/--no-monitor", help="Start the dashboard."),
        local: bool = typer.Option(False, "--local", help="Single-process run instead."),
        eval_every: int = typer.Option(50, "--eval-every", help="--local: validate every N."),
        threads: int = typer.Option(0, "--threads", help="--local: CPU threads (0 = all)."),
    ) -> None:
        """Run a local swarm: train, kill a peer, watch it recover."""
        if local:
            from shoal.cli._demo_local import run_local

            run_local(
                steps=300 if steps is None else steps,
                eval_every=eval_every,
                json_out=json_out,
                threads=threads,
            )
            return
        from shoal.cli._demo_state import DemoConfig, default_deadline_s
        from shoal.cli._demo_swarm import run_swarm_demo
        from shoal.cli._demo_view import Progress, print_summary

        steps = 100 if steps is None else steps
        cfg = DemoConfig(
            peers=peers,
            steps=steps,
            local_steps=local_steps,
            mode=mode,
            rate_mbit=rate_mbit,
            delay_ms=delay_ms,
            deadline_s=default_deadline_s(mode, steps, local_steps)
            if deadline_s is None
            else deadline_s,
            monitor=monitor,
            kill_peer=min(2, peers - 1),
        )
        stop = _stop_on_signals()
        live = sys.stdout.isatty() and not json_out
        progress = Progress(live=live, stream=sys.stderr if json_out else sys.stdout)
        with tempfile.TemporaryDirectory(prefix="shoal-demo-") as tmp:
            where = run_dir if run_dir is not None else Path(tmp)
            with progress:
                summary = run_swarm_demo(cfg, where, progress.show, stop)
        if json_out:
            sys.stdout.write(json.dumps(summary) + "\n")
        else:
            print_summary(summary, progress.console)


def _stop_on_signals() -> threading.Event:
    """Ctrl-C, SIGTERM and SIGHUP set an event the demo checks at safe points (so no child
    is ever started unowned); a second signal interrupts at once."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
    return stop
