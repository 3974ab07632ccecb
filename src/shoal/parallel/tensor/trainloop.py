"""Train one stage (or the whole model) densely or on a tensor-parallel group, same data.

Used by ``bench/tp.py`` and the tests to show that a tensor-parallel group is a faithful
re-layout of the dense model: both loops see the same batches from the same initial weights
and use the same AdamW arithmetic (``torch.optim.AdamW`` against ``ZeroAdamW``).

``train_tp_rank`` drives the group through ``TPStageRunner``, exactly as a stage server
would: rank 0 sends each batch as a BACKWARD work item (targets given, so the stage computes
the loss) followed by a STEP; the followers execute them in ``follow()``.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from typing import Any

import torch

from shoal.parallel.tensor.launch import RankContext
from shoal.parallel.tensor.parallelize import gather_dense_state
from shoal.parallel.tensor.serve import StageSpec, build_tp_stage

__all__ = ["train_dense", "train_tp_rank"]

Batch = tuple[torch.Tensor, torch.Tensor]


def _adamw_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for state in opt.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )


def _max_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def train_dense(spec: StageSpec, batches: Sequence[Batch]) -> dict[str, Any]:
    """Dense baseline: losses, step times (s), AdamW state bytes, final parameters."""
    stage = spec.dense_stage()
    params = [p for p in stage.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": spec.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=spec.lr,
        betas=spec.betas,
        eps=spec.eps,
    )
    losses, times = [], []
    for x, y in batches:
        start = time.perf_counter()
        loss = stage(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    return {
        "losses": losses,
        "step_times_s": times,
        "opt_state_bytes": _adamw_state_bytes(opt),
        "state": {k: v.detach().clone() for k, v in stage.named_parameters()},
    }


def train_tp_rank(ctx: RankContext, spec: StageSpec, batches: Sequence[Batch]) -> dict[str, Any]:
    """One rank of the tensor-parallel run (a ``launch_tp_group`` target).

    Returns, per rank: losses and step times (rank 0 only), AdamW state bytes held, flat
    shard bytes, bytes of this rank's model parameters, peak RSS, and (rank 0) the final
    parameters gathered back into dense layout.
    """
    runner = build_tp_stage(ctx, spec)
    opt = runner.optimizer
    assert opt is not None
    losses: list[float] = []
    times: list[float] = []
    if ctx.rank == 0:
        for x, y in batches:
            start = time.perf_counter()
            _, loss = runner.backward(x, targets=y)
            runner.step()
            times.append(time.perf_counter() - start)
            assert loss is not None
            losses.append(float(loss))
        runner.stop()
    else:
        runner.follow()
    dense = gather_dense_state(runner.stage, ctx.comm)
    param_bytes = sum(p.numel() * p.element_size() for p in runner.stage.parameters())
    return {
        "rank": ctx.rank,
        "losses": losses,
        "step_times_s": times,
        "opt_state_bytes": opt.state_bytes(),
        "shard_bytes": opt.shard_bytes(),
        "param_bytes": param_bytes,
        "max_rss_bytes": _max_rss_bytes(),
        "state": {k: v.cpu() for k, v in dense.items()} if ctx.rank == 0 else {},
    }
