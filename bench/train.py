"""Benchmark: tokens/s of Shoal's training loop against a plain hand-written PyTorch loop.

Both loops train the same model shape on the same byte windows (batch x seq_len), with
AdamW, gradient clipping and one ``loss.item()`` per step. They run in one process and
alternate in rounds (A B, B A, ...) so that load from other programs hits both alike; the
first round of each is a warm-up and is not counted. The ratio is Shoal's tokens/s over
the plain loop's over all counted rounds (>= 0.95 means less than 5% overhead); the median
of the per-round ratios is reported too, as a check against one noisy round.

    shoal bench train [--model tiny] [--rounds 8] [--steps-per-round 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the shoal CLI does (shoal.cli.train)

import torch

from shoal.models import GPT
from shoal.models.data import TrainWindows, load_corpus
from shoal.train.config import TrainConfig, with_overrides
from shoal.train.setup import make_optimizer, set_threads
from shoal.train.trainer import Trainer


class PlainLoop:
    """The baseline: the loop one would write by hand."""

    def __init__(self, cfg: TrainConfig, data: torch.Tensor) -> None:
        self.model = GPT(cfg.model.build(), seed=cfg.run.seed)
        self.opt = make_optimizer(self.model, cfg.optim)
        self.windows = TrainWindows(
            data, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, seed=cfg.run.seed
        )
        self.clip = cfg.optim.grad_clip

    def run(self, steps: int) -> None:
        for _ in range(steps):
            x, y = self.windows.next_batch()
            loss = self.model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            loss.item()


def main(argv: list[str]) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="shoal bench train")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps-per-round", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)

    set_threads(args.threads)
    cfg = with_overrides(
        TrainConfig(),
        {
            "model.name": args.model,
            "data.batch_size": args.batch_size,
            "data.seq_len": args.seq_len,
            "run.steps": 10**9,
            "run.eval_every": 0,
            "run.threads": args.threads,
            "run.device": "cpu",
            "checkpoint.every_steps": 0,
        },
    )
    trainer = Trainer(cfg, show_progress=False, log_lines=False)
    plain = PlainLoop(cfg, load_corpus().train)
    n = args.steps_per_round
    tokens = n * args.batch_size * args.seq_len

    def time_shoal() -> float:
        t0 = time.perf_counter()
        trainer.run(until=trainer.step + n)
        return time.perf_counter() - t0

    def time_plain() -> float:
        t0 = time.perf_counter()
        plain.run(n)
        return time.perf_counter() - t0

    shoal_s: list[float] = []
    plain_s: list[float] = []
    for r in range(args.rounds + 1):
        order = (time_shoal, time_plain) if r % 2 == 0 else (time_plain, time_shoal)
        results = {fn: fn() for fn in order}
        if r == 0:
            continue  # warm-up
        shoal_s.append(results[time_shoal])
        plain_s.append(results[time_plain])
        print(
            f"round {r}: shoal {tokens / shoal_s[-1]:,.0f} tok/s, "
            f"plain {tokens / plain_s[-1]:,.0f} tok/s",
            file=sys.stderr,
        )
    shoal_tps = tokens * len(shoal_s) / sum(shoal_s)
    plain_tps = tokens * len(plain_s) / sum(plain_s)
    return {
        "bench": "train",
        "ratio_vs_plain": round(shoal_tps / plain_tps, 4),
        "shoal_tokens_per_s": round(shoal_tps, 1),
        "plain_tokens_per_s": round(plain_tps, 1),
        "ratio_median_of_rounds": round(
            statistics.median(p / s for s, p in zip(shoal_s, plain_s, strict=True)), 4
        ),
        "model": args.model,
        "params": trainer.params,
        "tokens_per_round": tokens,
        "rounds": args.rounds,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(main(sys.argv[1:])))
