"""The local trainer: assembles a run from its config and drives the step loop.

``Trainer(cfg)`` builds device, model, optimizer, data streams and the ``StepFunction``;
``resume()`` loads the newest valid checkpoint of ``run.run_dir``; ``run()`` trains to
``run.steps`` (or ``until``), validating every ``run.eval_every`` steps and checkpointing every
``checkpoint.every_steps`` steps and at the end. Parallel strategies reuse the loop by
passing their own hooks to the ``StepFunction`` (see ``shoal.train.step``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shoal.models import GPT
from shoal.models.data import TrainWindows, load_corpus, val_batches
from shoal.state.checkpoint import load_latest_valid, write_snapshot
from shoal.train.config import TrainConfig
from shoal.train.evaluate import evaluate_bpb
from shoal.train.progress import RunProgress
from shoal.train.run_state import checkpoint_root, restore_run, snapshot_run
from shoal.train.schedule import warmup_cosine
from shoal.train.setup import autocast_for, make_optimizer, pick_device, set_threads
from shoal.train.step import StepFunction

__all__ = ["RunSummary", "StepRecord", "Trainer"]

log = logging.getLogger(__name__)

_TRAIN_LOSS_WINDOW = 10


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One finished optimizer step, as reported to ``on_step`` listeners."""

    step: int
    """Steps done after this one (1-based)."""
    train_loss: float
    lr: float
    val_bpb: float | None
    tokens_per_s: float


@dataclass(slots=True)
class RunSummary:
    """The outcome of ``Trainer.run`` (the CLI prints it as JSON)."""

    steps: int
    train_loss: float
    """Mean training loss (nats/byte) over the last 10 steps of this run."""
    val_bpb: float
    tokens_per_s: float
    """Training tokens per second of step time (evaluation and checkpoints excluded)."""
    params: int
    history: list[StepRecord] = field(default_factory=list)

    def as_json(self) -> dict[str, float | int]:
        return {
            "steps": self.steps,
            "train_loss": round(self.train_loss, 6),
            "val_bpb": round(self.val_bpb, 6),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "params": self.params,
        }


class Trainer:
    """A single-process training run."""

    def __init__(self, cfg: TrainConfig, *, show_progress: bool = True, log_lines: bool = True):
        self.cfg = cfg
        self.show_progress = show_progress
        self.log_lines = log_lines
        set_threads(cfg.run.threads)
        self.device = pick_device(cfg.run.device)
        self.autocast = autocast_for(self.device)
        torch.manual_seed(cfg.run.seed)
        corpus = load_corpus(cfg.data.dir, val_fraction=cfg.data.val_fraction)
        self.model_cfg = cfg.model.build()
        self.model = GPT(self.model_cfg, seed=cfg.run.seed).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg.optim)
        d = cfg.data
        self.windows = TrainWindows(
            corpus.train,
            seq_len=d.seq_len,
            batch_size=d.batch_size,
            seed=cfg.run.seed,
            shard_index=d.shard_index,
            num_shards=d.num_shards,
        )
        self.val = val_batches(
            corpus.val, seq_len=d.seq_len, batch_size=d.batch_size, max_batches=d.eval_batches
        )
        self.step_fn = StepFunction(
            self.model,
            self.optimizer,
            device=self.device,
            grad_clip=cfg.optim.grad_clip,
            autocast=self.autocast,
        )
        self.step = 0
        self.on_step: list[Callable[[StepRecord], None]] = []

    @property
    def params(self) -> int:
        return self.model.num_params()

    def _meta_config(self) -> dict[str, object]:
        return {**self.cfg.to_dict(), "model_shape": self.model_cfg.to_dict()}

    def lr_at(self, step: int) -> float:
        s = self.cfg.schedule
        return warmup_cosine(
            step,
            base_lr=self.cfg.optim.lr,
            warmup_steps=s.warmup_steps,
            total_steps=self.cfg.run.steps,
            min_lr_ratio=s.min_lr_ratio,
        )

    def resume(self) -> bool:
        """Continue from the newest valid checkpoint in the run dir; False if there is none."""
        ckpt = load_latest_valid(checkpoint_root(self.cfg.run.run_dir))
        if ckpt is None:
            return False
        self.step = restore_run(ckpt, self.model, self.optimizer, self.windows, self._meta_config())
        log.info("resumed from %s at step %d", ckpt.path, self.step)
        return True

    def save(self) -> Path:
        """Write a checkpoint of the current step (synchronously)."""
        snap = snapshot_run(
            self.step, self.model, self.optimizer, self.windows, self._meta_config()
        )
        return write_snapshot(
            snap, checkpoint_root(self.cfg.run.run_dir), keep_last=self.cfg.checkpoint.keep_last
        )

    def evaluate(self) -> float:
        return evaluate_bpb(self.model, self.val, device=self.device, autocast=self.autocast)

    def train_step(self) -> tuple[float, torch.Tensor]:
        """One optimizer step; returns (lr, detached mean loss)."""
        lr = self.lr_at(self.step)
        batches = [self.windows.next_batch() for _ in range(self.cfg.optim.grad_accum)]
        result = self.step_fn(self.step, batches, lr)
        self.step += 1
        return lr, result.loss

    def run(self, until: int | None = None) -> RunSummary:
        """Train up to step ``until`` (default ``run.steps``) and return the summary.

        Validation runs every ``run.eval_every`` steps and at ``run.steps``; a run stopped
        early by ``until`` reports the latest validation result (NaN if none yet).
        """
        cfg = self.cfg
        end = min(until or cfg.run.steps, cfg.run.steps)
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.optim.grad_accum
        every_eval, every_ckpt = cfg.run.eval_every, cfg.checkpoint.every_steps
        history: list[StepRecord] = []
        step_time, steps_done, val_bpb = 0.0, 0, float("nan")
        self.model.train()
        with RunProgress(
            end, start=self.step, enabled=self.show_progress, log_lines=self.log_lines
        ) as progress:
            while self.step < end:
                t0 = time.perf_counter()
                lr, loss_t = self.train_step()
                loss = float(loss_t)
                step_time += time.perf_counter() - t0
                steps_done += 1
                tok_s = steps_done * tokens_per_step / max(step_time, 1e-9)
                val: float | None = None
                if self.step == cfg.run.steps or (every_eval and self.step % every_eval == 0):
                    val = val_bpb = self.evaluate()
                    progress.log(f"step {self.step:>6d}  loss {loss:.4f}  val_bpb {val:.4f}")
                if every_ckpt and (self.step % every_ckpt == 0 or self.step == end):
                    self.save()
                record = StepRecord(self.step, loss, lr, val, tok_s)
                history.append(record)
                for listener in self.on_step:
                    listener(record)
                progress.update(self.step, loss, val, tok_s)
        if not history:  # already at the end (e.g. resumed a finished run)
            val_bpb = self.evaluate()
        recent = [r.train_loss for r in history[-_TRAIN_LOSS_WINDOW:]]
        return RunSummary(
            steps=self.step,
            train_loss=sum(recent) / len(recent) if recent else float("nan"),
            val_bpb=val_bpb,
            tokens_per_s=steps_done * tokens_per_step / step_time if step_time else 0.0,
            params=self.params,
            history=history,
        )
