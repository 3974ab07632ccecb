"""Rank-side code for the tensor-parallel tests (spawned processes import it by name).

Each function runs on every rank of a group made by ``launch_tp_group`` and returns plain
tensors; the tests compare them with dense computations done in the test process.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

from shoal.models import GPT, model_config, split_stages
from shoal.parallel.tensor import (
    StageSpec,
    TPStageRunner,
    ZeroAdamW,
    build_tp_stage,
    clip_grad_norm_tp,
    copy_to_tp,
    gather_dense_grads,
    gather_dense_state,
    parallelize_tp,
    reduce_from_tp,
    tp_shard_dim,
)
from shoal.parallel.tensor.launch import RankContext

CFG = model_config("tiny", n_layer=2, d_model=64, n_head=4, max_seq_len=64)
SEED = 3


def batch(seed: int, b: int = 2, t: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t), generator=g), torch.randint(0, 256, (b, t), generator=g)


def dense_model(dtype: torch.dtype) -> GPT:
    return GPT(CFG, seed=SEED).to(dtype)


def _replicated_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat(
        [
            p.grad.reshape(-1)
            for p in model.parameters()
            if tp_shard_dim(p) is None and p.grad is not None
        ]
    )


def model_checks(ctx: RankContext, dtype: torch.dtype) -> dict[str, Any]:
    """Logits, loss, gradients, a clipped norm, and two ZeRO-1 steps of a TP GPT."""
    torch.manual_seed(1234 + ctx.rank)  # ranks build from different seeds: rank 0's must win
    model = GPT(CFG, seed=SEED if ctx.rank == 0 else SEED + 1 + ctx.rank).to(dtype)
    parallelize_tp(model, ctx.comm)
    x, y = batch(0)
    out: dict[str, Any] = {"rank": ctx.rank}
    with torch.no_grad():
        out["logits"] = model(x)
    loss = model(x, y)
    loss.backward()
    out["loss"] = loss.detach()
    out["grads"] = gather_dense_grads(model, ctx.comm)
    out["replicated_grads"] = _replicated_grads(model)
    out["norm"] = clip_grad_norm_tp(model.parameters(), 1e9, ctx.comm)
    clip_grad_norm_tp(model.parameters(), out["norm"] / 2, ctx.comm)
    out["clipped_grads"] = gather_dense_grads(model, ctx.comm)
    model.zero_grad(set_to_none=True)
    opt = ZeroAdamW(model.parameters(), ctx.comm, lr=1e-2, weight_decay=0.1)
    for step in range(2):
        xs, ys = batch(10 + step)
        model(xs, ys).backward()
        opt.step()
        opt.zero_grad()
    out["after_steps"] = gather_dense_state(model, ctx.comm)
    out["opt_state_bytes"] = opt.state_bytes()
    out["after_injected"] = zero_with_injected_grads(ctx, dtype)
    return out


def injected_grads(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Dense gradients of the dense model at its initial weights on batch 30."""
    dense = dense_model(dtype)
    x, y = batch(30)
    dense(x, y).backward()
    return {n: p.grad.detach().clone() for n, p in dense.named_parameters()}


def zero_with_injected_grads(ctx: RankContext, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Two ZeroAdamW steps of a TP model whose gradients are set to shards of dense ones."""
    model = parallelize_tp(dense_model(dtype), ctx.comm)
    grads = injected_grads(dtype)
    opt = ZeroAdamW(model.parameters(), ctx.comm, lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        for name, p in model.named_parameters():
            dim = tp_shard_dim(p)
            g = grads[name]
            p.grad = g.clone() if dim is None else g.chunk(ctx.world_size, dim)[ctx.rank].clone()
        opt.step()
        opt.zero_grad()
    return gather_dense_state(model, ctx.comm)


def runner_checks(ctx: RankContext, dtype_name: str) -> dict[str, Any]:
    """Drive two TP stages (boundary at block 1) through the runner, as a stage server does."""
    results: dict[str, Any] = {}
    for index in (0, 1):
        spec = StageSpec(
            model=CFG, seed=SEED, boundaries=(1,), index=index, lr=1e-2, dtype=dtype_name
        )
        runner: TPStageRunner = build_tp_stage(ctx, spec)
        if ctx.rank != 0:
            results[f"followed{index}"] = runner.follow()
            continue
        x_ids, y = batch(20)
        if index == 0:
            results["fwd0"] = runner.forward(x_ids)
            g = torch.randn(
                results["fwd0"].shape,
                generator=torch.Generator().manual_seed(5),
                dtype=results["fwd0"].dtype,
            )
            results["grad_out0"] = g
            results["bwd0"] = runner.backward(x_ids, g)
        else:
            h = torch.randn(
                2,
                16,
                CFG.d_model,
                generator=torch.Generator().manual_seed(6),
                dtype=getattr(torch, dtype_name),
            )
            results["h1"] = h
            results["fwd1_loss"] = runner.forward(h, y)
            results["bwd1"] = runner.backward(h, targets=y)
            runner.step()
            results["fwd1_after_step"] = runner.forward(h, y)
        runner.stop()
    return results


def dense_stages(dtype: torch.dtype) -> list[torch.nn.Module]:
    return split_stages(dense_model(dtype), [1], tie="copy")


def fg_checks(ctx: RankContext) -> dict[str, torch.Tensor]:
    """f then a rank-dependent scale then g: y = x * sum(w_r), dx = sum(w_r) on every rank."""
    x = torch.arange(4, dtype=torch.float64).requires_grad_(True)
    w = torch.full((4,), float(ctx.rank + 1), dtype=torch.float64)
    y = reduce_from_tp(copy_to_tp(x, ctx.comm) * w, ctx.comm)
    y.sum().backward()
    assert x.grad is not None
    return {"y": y.detach(), "dx": x.grad}


def all_checks(ctx: RankContext) -> dict[str, Any]:
    """Every rank-side check, in float64 (exactness) and float32."""
    out: dict[str, Any] = {
        name: {"model": model_checks(ctx, getattr(torch, name)), "runner": runner_checks(ctx, name)}
        for name in ("float64", "float32")
    }
    out["fg"] = fg_checks(ctx)
    return out


def _record_pid(pid_dir: str, rank: int) -> None:
    path = os.path.join(pid_dir, f"rank{rank}.pid")
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    fifo = os.path.join(pid_dir, "ready.fifo")
    if os.path.exists(fifo):  # a test waits on it for the ranks to be up
        with open(fifo, "w") as f:
            f.write(f"{os.getpid()}\n")


def fail_on_rank1(ctx: RankContext, pid_dir: str) -> None:
    """Rank 1 raises; rank 0 hangs (never returns) until the launcher kills it."""
    _record_pid(pid_dir, ctx.rank)
    if ctx.rank == 1:
        raise ValueError("deliberate failure on rank 1")
    threading.Event().wait()


def hang(ctx: RankContext, pid_dir: str) -> None:
    """Every rank records its pid and then never returns."""
    _record_pid(pid_dir, ctx.rank)
    threading.Event().wait()
