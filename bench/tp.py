"""Tensor parallelism against the dense model: same seed, same batches, same AdamW.

``shoal bench tp --tp 2 [--model small] [--steps 20] [--dtype float64] [--json]`` trains the
model densely in this process and on a local tensor-parallel group of ``--tp`` spawned ranks
(gloo on CPU, NCCL with enough GPUs), each for ``--steps`` AdamW steps on identical batches
from the embedded corpus. ``--threads`` torch threads (default 1) for the dense run and for
each rank: TP=N then uses N times the cores of the dense run, so on an idle machine the ideal
``step_time_ratio`` is 1/N plus the cost of communication.

Prints ``max_loss_diff`` (largest |loss_tp - loss_dense| over the steps), ``max_param_diff``
after the last step, ``step_time_ratio`` (mean TP step time / mean dense step time, first
step excluded as warm-up) and the optimizer memory per rank: AdamW state bytes on each TP
rank with ZeRO-1, what each rank would hold without it, and the dense optimizer's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from shoal.models import model_config
from shoal.models.data import TrainWindows, load_corpus
from shoal.parallel.tensor.config import LaunchConfig
from shoal.parallel.tensor.launch import launch_tp_group
from shoal.parallel.tensor.serve import StageSpec
from shoal.parallel.tensor.trainloop import train_dense, train_tp_rank


def _log(msg: str) -> None:
    print(f"[bench tp] {msg}", file=sys.stderr, flush=True)


def _mean_after_warmup(times: list[float]) -> float:
    return statistics.fmean(times[1:] if len(times) > 1 else times)


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="shoal bench tp")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--model", default="small")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads of the dense run and of each TP rank"
    )
    ap.add_argument("--json", action="store_true", help="accepted; the output is always JSON")
    args = ap.parse_args(argv)

    spec = StageSpec(
        model=model_config(args.model),
        seed=args.seed,
        lr=args.lr,
        weight_decay=0.1,
        dtype=args.dtype,
    )
    corpus = load_corpus()
    windows = TrainWindows(corpus.train, seq_len=args.seq, batch_size=args.batch, seed=args.seed)
    batches = [windows.next_batch() for _ in range(args.steps)]

    torch.set_num_threads(args.threads)
    _log(f"dense {args.model} ({args.dtype}), {args.steps} steps ...")
    start = time.perf_counter()
    dense = train_dense(spec, batches)
    _log(f"dense done in {time.perf_counter() - start:.1f}s; TP={args.tp} ...")
    start = time.perf_counter()
    ranks = launch_tp_group(
        args.tp,
        train_tp_rank,
        (spec, batches),
        config=LaunchConfig(run_timeout_s=1800.0, threads_per_rank=args.threads),
    )
    _log(f"tp done in {time.perf_counter() - start:.1f}s (including process start)")

    lead = ranks[0]
    loss_diffs = [abs(a - b) for a, b in zip(lead["losses"], dense["losses"], strict=True)]
    param_diff = max(
        float((lead["state"][k].to(v.dtype) - v).abs().max()) for k, v in dense["state"].items()
    )
    return {
        "bench": "tp",
        "max_loss_diff": max(loss_diffs),
        "step_time_ratio": _mean_after_warmup(lead["step_times_s"])
        / _mean_after_warmup(dense["step_times_s"]),
        "tp": args.tp,
        "model": args.model,
        "dtype": args.dtype,
        "steps": args.steps,
        "batch_tokens": args.batch * args.seq,
        "max_param_diff": param_diff,
        "loss_first_last": [round(dense["losses"][0], 4), round(dense["losses"][-1], 4)],
        "dense_step_s": _mean_after_warmup(dense["step_times_s"]),
        "tp_step_s": _mean_after_warmup(lead["step_times_s"]),
        "opt_state_bytes_dense": dense["opt_state_bytes"],
        "opt_state_bytes_per_rank": [r["opt_state_bytes"] for r in ranks],
        "opt_state_bytes_per_rank_without_zero": [2 * r["param_bytes"] for r in ranks],
        "zero_flat_shard_bytes_per_rank": [r["shard_bytes"] for r in ranks],
        "param_bytes_per_rank": [r["param_bytes"] for r in ranks],
        "max_rss_mb_per_rank": [round(r["max_rss_bytes"] / 2**20, 1) for r in ranks],
        "backend": "gloo" if not torch.cuda.is_available() else "auto",
        "threads_dense": args.threads,
        "threads_per_rank": args.threads,
    }
