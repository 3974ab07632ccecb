"""Progress display for long runs: a rich bar on a terminal, sparse lines otherwise."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

__all__ = ["RunProgress"]


class RunProgress:
    """A step bar showing loss, validation bpb and throughput.

    The bar is drawn only when ``enabled`` and stdout is a terminal. Validation results are
    also written as one line each to stderr when ``log_lines`` (so logs of headless runs
    still show the curve); nothing ever goes to stdout except the bar.
    """

    def __init__(self, total: int, *, start: int = 0, enabled: bool = True, log_lines: bool = True):
        self.log_lines = log_lines
        self._progress: Progress | None = None
        self._task = None
        if enabled and sys.stdout.isatty():
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=Console(file=sys.stdout),
                transient=False,
            )
            self._task = self._progress.add_task("train", total=total, completed=start, info="")

    def __enter__(self) -> RunProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, step: int, loss: float, val_bpb: float | None, tokens_per_s: float) -> None:
        if self._progress is not None and self._task is not None:
            bpb = "" if val_bpb is None else f" val_bpb {val_bpb:.3f}"
            info = f"loss {loss:.3f}{bpb} {tokens_per_s:,.0f} tok/s"
            self._progress.update(self._task, completed=step, info=info)

    def log(self, message: str) -> None:
        if not self.log_lines:
            return
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            print(message, file=sys.stderr, flush=True)
