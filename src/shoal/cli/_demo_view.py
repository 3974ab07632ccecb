"""How ``shoal demo`` shows its swarm: a live ``rich`` table on a terminal, plain lines
otherwise, and the final summary as a table or one JSON line.

``Progress`` is a context manager whose ``show(state, message)`` is the scenario's callback:
messages are printed above the live table (or as lines); the table is redrawn at most a few
times per second. In plain mode only messages and round completions are printed.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from shoal.cli._demo_state import SwarmState

__all__ = ["Progress", "print_summary"]


def _table(state: SwarmState) -> Table:
    table = Table(title="shoal demo: a local swarm on shaped links", expand=False)
    for col in ("peer", "status", "step", "loss", "rounds", "peers seen", "MB sent", "note"):
        table.add_column(
            col,
            justify="left" if col in ("peer", "status", "note") else "right",
            no_wrap=True,
            overflow="ellipsis",
        )
    for row in state.rows.values():
        table.add_row(
            row.name,
            row.status,
            str(row.step),
            "-" if row.loss is None else f"{row.loss:.3f}",
            str(row.round_index),
            str(row.peers_seen or "-"),
            f"{(row.bytes_sent + row.bytes_earlier) / 1e6:.2f}",
            row.note[:32],
        )
    return table


class Progress:
    """Live table (``live=True``) or plain lines on ``stream``."""

    def __init__(self, *, live: bool, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.console = Console(file=self.stream)
        self._live: Live | None = None
        self._use_live = live
        self._last_draw = 0.0
        self._rounds: dict[str, int] = {}

    def __enter__(self) -> Progress:
        if self._use_live:
            self._live = Live(
                Text("starting the swarm..."), console=self.console, auto_refresh=False
            )
            self._live.__enter__()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.__exit__(et, ev, tb)
            self._live = None

    def show(self, state: SwarmState, message: str) -> None:
        if self._live is not None:
            if message:
                self.console.print(message)
            now = time.monotonic()
            if message or now - self._last_draw > 0.25:
                self._last_draw = now
                self._live.update(Group(_table(state)), refresh=True)
            return
        if message:
            self._line(message)
        for row in state.rows.values():
            if row.rounds_ok and self._rounds.get(row.name) != row.rounds_ok:
                self._rounds[row.name] = row.rounds_ok
                loss = "-" if row.loss is None else f"{row.loss:.3f}"
                self._line(
                    f"{row.name}: round {row.round_index} done, step {row.step}, loss {loss}, "
                    f"{(row.bytes_sent + row.bytes_earlier) / 1e6:.2f} MB sent"
                )

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


def print_summary(summary: dict[str, Any], console: Console) -> None:
    table = Table(title="shoal demo: summary", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    mb = 1e6

    def fmt(v: Any, unit: str = "") -> str:
        return "-" if v is None else f"{v}{unit}"

    rows = [
        ("peers / mode", f"{summary['peers']} / {summary['mode']} (H={summary['local_steps']})"),
        ("validation bpb: start -> end", f"{fmt(summary['loss_before'])} -> {fmt(summary['loss_after'])}"),
        ("local steps (all peers)", str(summary["total_steps"])),
        ("sent by the swarm", f"{summary['bytes_sent'] / mb:.2f} MB"),
        ("fp32 all-reduce every step", f"{summary['bytes_fp32_allreduce'] / mb:.2f} MB"),
        ("ratio", fmt(summary["bytes_ratio"], "x")),
        ("killed", f"{summary['killed']} (SIGKILL), recovered from {summary['recovered_from'] or '-'}"),
        ("restart -> state recovered, in the swarm", fmt(summary["back_in_swarm_s"], " s")),
        ("recovered_s (restart -> first round)", fmt(summary["recovered_s"], " s")),
        ("peers alive at the end", str(summary["peers_alive"])),
        ("dashboard", fmt(summary["dashboard"])),
        ("wall time", f"{summary['wall_s']} s"),
    ]  # fmt: skip
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)
