"""The ``shoal demo`` scenario: a local swarm that trains, loses a peer and gets it back.

``run_swarm_demo(cfg, run_dir, show)`` starts, on loopback, a bootstrap DHT node (``shoal
dht serve``), one link shaper per training peer (``_demo_links``), ``cfg.peers`` training
peers (``shoal peer --mode diloco --json`` announcing their shaper's address) and the
dashboard (``shoal monitor --join``). It follows the peers' JSON lines; once the victim
has completed ``kill_after_rounds`` rounds it is killed with SIGKILL and started again
with the same run dir and port; the demo waits for it to complete a round again
(``recovered_s``: restart to that round) and for every peer to finish its steps. Every
wait has a deadline, and the run as a whole has ``cfg.deadline_s``; a missed one raises
``DemoTimeout`` naming what did not happen. Children are always taken down on the way out.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shoal.cli._demo_links import Links
from shoal.cli._demo_procs import Children, Line
from shoal.cli._demo_state import DemoConfig, SwarmState, fp32_allreduce_bytes
from shoal.errors import ShoalError
from shoal.testbed.procs import pid_alive, spare_port

__all__ = ["DemoTimeout", "run_swarm_demo"]

Show = Callable[[SwarmState, str], None]
"""Called with the state and a one-line message (empty: only the table changed)."""

_SHOAL = [sys.executable, "-m", "shoal.cli.main"]
_SWARM = "demo"


class DemoTimeout(ShoalError):
    """A step of the demo did not happen before its deadline."""


def _baseline(cfg: DemoConfig, out: dict[str, Any]) -> None:
    """Validation bpb of the initial model every peer starts from, and its size."""
    try:
        import torch

        from shoal.train.swarm_config import PeerOptions
        from shoal.train.swarm_peer import build_trainer

        torch.set_num_threads(1)
        opts = PeerOptions(seq_len=cfg.seq_len, batch_size=cfg.batch_size, steps=cfg.steps)
        trainer = build_trainer(opts, opts.seed)
        out["params"] = sum(p.numel() for p in trainer.model.parameters())
        out["val_bpb"] = trainer.evaluate()
    except Exception as exc:  # reported in the summary, never fatal
        out["error"] = repr(exc)


class _Run:
    def __init__(self, cfg: DemoConfig, run_dir: Path, show: Show, stop: threading.Event) -> None:
        self.cfg = cfg
        self.stop = stop
        self.run_dir = run_dir
        self.show = show
        self.state = SwarmState()
        self.children = Children(run_dir / "logs")
        self.links = Links(rate_mbit=cfg.rate_mbit, delay_ms=cfg.delay_ms)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + cfg.deadline_s
        self.peer_argv: dict[str, list[str]] = {}
        self.bootstrap = ""
        self.dashboard = ""
        self.killed_at: float | None = None
        self.restarted_at: float | None = None

    # -- waiting ------------------------------------------------------------------------
    def pump(self, until: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Handle child lines until ``until()`` holds; ``DemoTimeout(what)`` past the deadline."""
        end = min(time.monotonic() + timeout_s, self.deadline)
        while not until():
            if self.stop.is_set():
                raise KeyboardInterrupt
            left = end - time.monotonic()
            if left <= 0:
                overall = end >= self.deadline
                limit = self.cfg.deadline_s if overall else timeout_s
                raise DemoTimeout(
                    f"{what} within {limit:.0f} s"
                    + (" (demo deadline)" if overall else "")
                    + self._peer_notes()
                )
            try:
                line = self.children.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            self.handle(line)

    def _peer_notes(self) -> str:
        rows = self.state.rows.values()
        notes = [f"{r.name} at step {r.step}: {r.note or r.status}" for r in rows]
        return ("; " + "; ".join(notes)) if notes else ""

    def handle(self, line: Line) -> None:
        name = line.name
        if line.text is None:
            code = self.children.returncode(name)
            row = self.state.row(name) if name.startswith("peer") else None
            if row and row.status not in ("done", "killed") and line.incarnation == row.incarnation:
                raise ShoalError(
                    f"{name} exited (code {code}) before finishing; its log says:\n"
                    + self.children.stderr_tail(name)
                )
            return
        if name == "bootstrap" and not self.bootstrap:
            self.bootstrap = line.text.split()[0]
        elif name == "monitor" and not self.dashboard and line.text.startswith("http"):
            self.dashboard = line.text.strip()
            self.show(self.state, f"dashboard: {self.dashboard}")
        elif name.startswith("peer") and line.text.startswith("{"):
            if line.incarnation != self.state.row(name).incarnation:
                return  # a late line of a killed incarnation
            try:
                event = json.loads(line.text)
            except json.JSONDecodeError:
                return
            self.state.apply(name, event, line.at_s)
            self.show(self.state, "")

    # -- phases -------------------------------------------------------------------------
    def start_bootstrap(self) -> None:
        self.children.start(
            "bootstrap",
            [
                *_SHOAL,
                "dht",
                "serve",
                "--swarm",
                _SWARM,
                "--key-file",
                str(self.run_dir / "boot.key"),
            ],
        )
        self.pump(
            lambda: bool(self.bootstrap),
            self.cfg.start_timeout_s,
            "the bootstrap node did not start",
        )
        self.show(self.state, f"bootstrap DHT node at {self.bootstrap}")

    def start_peers(self) -> None:
        cfg = self.cfg
        for i in range(cfg.peers):
            name = f"peer{i}"
            port = spare_port()
            announce = self.links.add(port)
            peer_dir = self.run_dir / name
            self.peer_argv[name] = [
                sys.executable, "-m", "shoal.cli.main", "peer", "--announce", announce,
                "--mode", cfg.mode, "--json", "--swarm", _SWARM, "--join", self.bootstrap,
                "--run-dir", str(peer_dir), "--port", str(port),
                "--events", str(peer_dir / "events.jsonl"),
                "--steps", str(cfg.steps), "-H", str(cfg.local_steps),
                "--batch-size", str(cfg.batch_size), "--seq-len", str(cfg.seq_len),
                "--window", str(cfg.window_s), "--heartbeat", str(cfg.heartbeat_s),
                "--report-every", "5", "--threads", "1", "--checkpoint-every", "1",
            ]  # fmt: skip
            self.children.start(name, self.peer_argv[name])
            self.state.row(name).started_s = time.monotonic()
        self.show(
            self.state,
            f"{cfg.peers} peers, each behind a {cfg.rate_mbit:g} Mbit/s link with "
            f"{cfg.delay_ms:g} ms one-way latency",
        )
        if cfg.monitor:
            self.children.start(
                "monitor",
                [*_SHOAL, "monitor", "--join", self.bootstrap, "--swarm", _SWARM, "--port", "0"],
            )
        rows = self.state.rows
        self.pump(
            lambda: all(r.status == "training" for r in rows.values()),
            self.cfg.start_timeout_s,
            "not every peer was training",
        )

    def kill_and_restart(self) -> None:
        cfg = self.cfg
        name = f"peer{cfg.kill_peer}"
        row = self.state.row(name)
        self.pump(
            lambda: row.rounds_ok >= cfg.kill_after_rounds,
            self.deadline - time.monotonic(),
            f"{name} did not complete {cfg.kill_after_rounds} round(s)",
        )
        self.children.kill(name)
        self.killed_at = time.monotonic()
        row.status = "killed"
        self.show(self.state, f"SIGKILL {name} at step {row.step}")
        inc = self.children.start(name, self.peer_argv[name])
        self.restarted_at = time.monotonic()
        self.state.restart(name, inc, self.restarted_at)
        self.show(self.state, f"restarted {name}")
        self.pump(
            lambda: row.first_round_s is not None,
            cfg.rejoin_timeout_s,
            f"{name} did not rejoin (complete a round after its restart)",
        )
        took_s = (row.first_round_s or 0.0) - self.restarted_at
        self.show(
            self.state,
            f"{name} is back: recovered from {row.recovered_from or '?'} at step "
            f"{row.recovered_step}, first round {took_s:.1f} s after its restart",
        )

    def finish(self) -> None:
        rows = self.state.rows
        self.pump(
            lambda: all(r.status == "done" for r in rows.values()),
            self.deadline - time.monotonic(),
            "not every peer finished its steps",
        )

    def summary(self, base: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        victim = self.state.row(f"peer{cfg.kill_peer}")
        restarted = self.restarted_at
        recovered_s = (
            round(victim.first_round_s - restarted, 2)
            if restarted is not None and victim.first_round_s is not None
            else None
        )
        back_s = (
            round(victim.ready_s - restarted, 2)
            if restarted is not None and victim.ready_s is not None
            else None
        )
        params = int(base.get("params", 0))
        steps = self.state.total_steps()
        sent = self.state.total_bytes()
        fp32 = fp32_allreduce_bytes(params, cfg.peers, steps)
        after = self.state.final_bpb()
        before = base.get("val_bpb")
        return {
            "mode": cfg.mode,
            "peers": cfg.peers,
            "steps_per_peer": cfg.steps,
            "local_steps": cfg.local_steps,
            "total_steps": steps,
            "params": params,
            "loss_before": None if before is None else round(float(before), 4),
            "loss_after": None if after is None else round(after, 4),
            "loss_unit": "validation bits per byte",
            "bytes_sent": sent,
            "bytes_fp32_allreduce": fp32,
            "bytes_ratio": round(fp32 / sent, 1) if sent else None,
            "link": {"rate_mbit": cfg.rate_mbit, "delay_ms": cfg.delay_ms},
            "bytes_through_shapers": self.links.carried_bytes(),
            "killed": victim.name,
            "rejoined": victim.first_round_s is not None,
            "recovered_from": victim.recovered_from,
            "recovered_step": victim.recovered_step,
            "recovered_s": recovered_s,
            "back_in_swarm_s": back_s,
            "peers_alive": sum(1 for r in self.state.rows.values() if r.status == "done"),
            "dashboard": self.dashboard or None,
            "wall_s": round(time.monotonic() - self.t0, 1),
            "run_dir": str(self.run_dir),
            "pids": list(self.children.pids),
            **({"baseline_error": base["error"]} if "error" in base else {}),
        }

    def close(self) -> None:
        try:
            self.children.close()
        finally:
            self.links.close()


def run_swarm_demo(
    cfg: DemoConfig, run_dir: Path, show: Show, stop: threading.Event | None = None
) -> dict[str, Any]:
    """Run the scenario (see the module docstring) and return the summary.

    ``stop`` (set from a signal handler) is checked between child lines, at least every
    0.5 s; once set, the run raises ``KeyboardInterrupt`` after taking its children down.
    Interrupting at safe points only means a child is never started without being owned.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    base: dict[str, Any] = {}
    baseline = threading.Thread(
        target=_baseline, args=(cfg, base), name="demo-baseline", daemon=True
    )
    baseline.start()
    run = _Run(cfg, run_dir, show, stop if stop is not None else threading.Event())
    try:
        run.start_bootstrap()
        run.start_peers()
        run.kill_and_restart()
        run.finish()
        baseline.join(timeout=max(1.0, run.deadline - time.monotonic()))
        out = run.summary(base)
    finally:
        run.close()
    out["leftover_pids"] = [p for p in run.children.pids if pid_alive(p)]
    return out
