"""`shoal train`: a local (single-process) training run of the reference model."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from shoal.train.config import TrainConfig

__all__ = ["build_config", "register", "setup_logging"]

# OpenMP threads that sleep instead of spinning while they wait: on a machine shared with
# other peers or programs, spinning threads make torch many times slower (measured here:
# 25 s instead of 2.3 s per tiny-model step at a load of 18 on 2 cores). libgomp reads this
# once when torch is first imported, so it is set here, before any torch import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def setup_logging() -> None:
    """Send Shoal's log lines to stderr unless the embedding program configured logging.
    Lines written to a file or pipe (read later, and next to other peers' logs) carry the
    wall-clock time; a terminal shows them as they happen."""
    root = logging.getLogger()
    if not root.handlers:
        stamped = not sys.stderr.isatty()
        logging.basicConfig(
            level=logging.INFO,
            stream=sys.stderr,
            format="shoal %(asctime)s.%(msecs)03d %(message)s" if stamped else "shoal: %(message)s",
            datefmt="%H:%M:%S",
        )


def build_config(config_file: str | Path | None, flags: dict[str, Any]) -> TrainConfig:
    """Defaults, then the TOML file, then the command-line flags (None = not given)."""
    from shoal.train.config import TrainConfig, load_config, with_overrides

    cfg = load_config(config_file) if config_file is not None else TrainConfig()
    return with_overrides(cfg, flags)


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        model: str = typer.Option(None, "--model", help="Model size: tiny, small, base, 1b."),
        steps: int = typer.Option(None, "--steps", help="Optimizer steps to reach."),
        batch_size: int = typer.Option(None, "--batch-size", help="Windows per micro-batch."),
        seq_len: int = typer.Option(None, "--seq-len", help="Bytes per window."),
        lr: float = typer.Option(None, "--lr", help="Peak learning rate."),
        warmup_steps: int = typer.Option(None, "--warmup-steps", help="Linear warmup steps."),
        grad_accum: int = typer.Option(None, "--grad-accum", help="Micro-batches per step."),
        config: str = typer.Option(None, "--config", help="TOML config file."),
        run_dir: str = typer.Option(None, "--run-dir", help="Folder for checkpoints."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint."),
        json_out: bool = typer.Option(False, "--json", help="Print one final JSON line only."),
        data_dir: str = typer.Option(None, "--data-dir", help="Text files instead of the stdlib."),
        seed: int = typer.Option(None, "--seed", help="Seed of init, data and RNGs."),
        eval_every: int = typer.Option(None, "--eval-every", help="Validate every N steps."),
        ckpt_every: int = typer.Option(
            None, "--ckpt-every", help="Checkpoint every N steps (0 off)."
        ),
        device: str = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
        threads: int = typer.Option(None, "--threads", help="CPU threads (0 = all cores)."),
    ) -> None:
        """Train the reference byte-level model on this machine."""
        setup_logging()
        flags: dict[str, Any] = {
            "model.name": model,
            "run.steps": steps,
            "data.batch_size": batch_size,
            "data.seq_len": seq_len,
            "optim.lr": lr,
            "schedule.warmup_steps": warmup_steps,
            "optim.grad_accum": grad_accum,
            "run.run_dir": run_dir,
            "run.resume": True if resume else None,
            "data.dir": data_dir,
            "run.seed": seed,
            "run.eval_every": eval_every,
            "checkpoint.every_steps": ckpt_every,
            "run.device": device,
            "run.threads": threads,
        }
        cfg = build_config(config, flags)
        from shoal.train.trainer import Trainer  # torch import only when training

        trainer = Trainer(cfg, show_progress=not json_out, log_lines=True)
        if cfg.run.resume and not trainer.resume():
            logging.getLogger("shoal.train").info(
                "no checkpoint in %s; starting from step 0", cfg.run.run_dir
            )
        summary = trainer.run()
        if json_out:
            sys.stdout.write(json.dumps(summary.as_json()) + "\n")
        else:
            print(
                f"done: {summary.steps} steps, train_loss {summary.train_loss:.4f}, "
                f"val_bpb {summary.val_bpb:.4f}, {summary.tokens_per_s:,.0f} tokens/s, "
                f"{summary.params:,} params"
            )
