"""Rank-side code for the GPU tensor-parallel tests (spawned processes import it by name)."""

from __future__ import annotations

from typing import Any

import torch

from shoal.models import GPT, model_config
from shoal.parallel.tensor import ZeroAdamW, gather_dense_grads, parallelize_tp
from shoal.parallel.tensor.launch import RankContext

CFG = model_config("tiny", n_layer=2, d_model=128, n_head=4, max_seq_len=128)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (4, 64), generator=g), torch.randint(0, 256, (4, 64), generator=g)


def gpu_checks(ctx: RankContext, autocast: bool) -> dict[str, Any]:
    """Loss and dense-layout gradients of a TP GPT on this rank's GPU (bf16 autocast or fp32)."""
    model = parallelize_tp(GPT(CFG, seed=1).to(ctx.device), ctx.comm)
    x, y = (t.to(ctx.device) for t in batch())
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = model(x, y)
    loss.backward()
    grads = {k: v.float().cpu() for k, v in gather_dense_grads(model, ctx.comm).items()}
    dtypes = {str(p.grad.dtype) for p in model.parameters() if p.grad is not None}
    opt = ZeroAdamW(model.parameters(), ctx.comm, lr=1e-3)
    opt.step()
    return {
        "backend": ctx.comm.backend,
        "loss": float(loss),
        "grads": grads,
        "grad_dtypes": sorted(dtypes),
        "device": str(ctx.device),
    }
