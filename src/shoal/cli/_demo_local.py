"""`shoal demo --local`: one process trains the tiny model, no swarm.

It trains the ``tiny`` model on the embedded standard-library corpus for a minute or two
on a laptop CPU and prints a table of step / train loss / validation bits per byte.
"""

from __future__ import annotations

import json
import sys
import tempfile

__all__ = ["run_local"]


def run_local(*, steps: int, eval_every: int, json_out: bool, threads: int) -> None:
    """Train a tiny model locally and show its loss curve."""
    from rich.console import Console
    from rich.table import Table

    from shoal.cli.train import setup_logging
    from shoal.train.config import TrainConfig, with_overrides
    from shoal.train.trainer import Trainer

    setup_logging()
    with tempfile.TemporaryDirectory(prefix="shoal-demo-") as run_dir:
        cfg = with_overrides(
            TrainConfig(),
            {
                "model.name": "tiny",
                "run.steps": steps,
                "run.eval_every": eval_every,
                "run.run_dir": run_dir,
                "checkpoint.every_steps": 0,
                "run.threads": threads,
            },
        )
        summary = Trainer(cfg, show_progress=not json_out, log_lines=not json_out).run()
    if json_out:
        curve = [
            {
                "step": r.step,
                "train_loss": round(r.train_loss, 4),
                "val_bpb": round(r.val_bpb, 4),
            }
            for r in summary.history
            if r.val_bpb is not None
        ]
        sys.stdout.write(json.dumps({**summary.as_json(), "curve": curve}) + "\n")
        return
    table = Table(title="shoal demo: tiny byte-level GPT on the Python standard library")
    for name in ("step", "train loss (nats/byte)", "val (bits/byte)"):
        table.add_column(name, justify="right")
    for r in summary.history:
        if r.val_bpb is not None:
            table.add_row(str(r.step), f"{r.train_loss:.3f}", f"{r.val_bpb:.3f}")
    console = Console()
    console.print(table)
    console.print(f"{summary.params:,} parameters, {summary.tokens_per_s:,.0f} tokens/s")
