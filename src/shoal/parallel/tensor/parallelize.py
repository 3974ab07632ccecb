"""Apply tensor parallelism to a dense reference model from outside, and undo it.

``parallelize_tp(model, comm)`` works on a ``GPT`` or on any module holding its ``Block``s
(a pipeline ``Stage``): it swaps each block's ``attn`` and ``mlp`` for ``TPAttention`` and
``TPMLP`` cut from the dense weights, so the result is a faithful re-layout of the dense model.
Embedding, layer norms, the tied head and the row-parallel biases stay replicated (the
vocabulary is 256 bytes, so a vocabulary-parallel embedding and head would save little and
are left out). Parameter names are unchanged; sharded ones have a smaller shape.

``gather_dense_state(model, comm)`` all-gathers the shards back into a dense state dict (the
same on every rank), e.g. for checkpoints or to compare with a dense model.

``clip_grad_norm_tp`` clips by the global gradient norm of the re-laid-out model: replicated
gradients count once, the squares of sharded ones are summed over the group.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from shoal.models.gpt import Block
from shoal.parallel.tensor.comm import TPComm
from shoal.parallel.tensor.layers import TPMLP, TPAttention, tp_shard_dim

__all__ = ["clip_grad_norm_tp", "gather_dense_grads", "gather_dense_state", "parallelize_tp"]


@torch.no_grad()
def parallelize_tp(
    model: nn.Module, comm: TPComm, *, overlap: bool = True, sync_from_rank0: bool = True
) -> nn.Module:
    """Shard every ``Block`` of ``model`` in place over ``comm`` and return ``model``.

    Args:
        model: a dense ``GPT`` or ``Stage``; the same module structure on every rank.
        comm: the tensor-parallel group.
        overlap: overlap the input-gradient all-reduce with weight-gradient compute.
        sync_from_rank0: first broadcast every dense parameter and buffer from rank 0, so the
            shards come from one dense model even if ranks built theirs differently.

    Raises:
        ConfigError: heads or MLP width not divisible by the group size.
    """
    if sync_from_rank0:
        for t in [*model.parameters(), *model.buffers()]:
            comm.broadcast(t.data, src=0)
    for module in list(model.modules()):
        if isinstance(module, Block):
            module.attn = TPAttention(module.attn, comm, overlap=overlap)  # type: ignore[assignment]
            module.mlp = TPMLP(module.mlp, comm, overlap=overlap)  # type: ignore[assignment]
    return model


@torch.no_grad()
def gather_dense_state(model: nn.Module, comm: TPComm) -> dict[str, torch.Tensor]:
    """Dense parameters of a tensor-parallel ``model`` by name (collective; all ranks call)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        dim = tp_shard_dim(p)
        if dim is None:
            out[name] = p.detach().clone()
            continue
        parts = [torch.empty_like(p) for _ in range(comm.world_size)]
        comm.all_gather(parts, p.detach().contiguous())
        out[name] = torch.cat(parts, dim=dim)
    return out


@torch.no_grad()
def gather_dense_grads(model: nn.Module, comm: TPComm) -> dict[str, torch.Tensor]:
    """Dense gradients by name, like ``gather_dense_state`` (missing grads read as zeros)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dim = tp_shard_dim(p)
        if dim is None:
            out[name] = g.detach().clone()
            continue
        parts = [torch.empty_like(g) for _ in range(comm.world_size)]
        comm.all_gather(parts, g.detach().contiguous())
        out[name] = torch.cat(parts, dim=dim)
    return out


@torch.no_grad()
def clip_grad_norm_tp(params: Iterable[nn.Parameter], max_norm: float, comm: TPComm) -> float:
    """Scale gradients so the global norm is at most ``max_norm``; returns the norm before."""
    grads = [(p.grad, tp_shard_dim(p)) for p in params if p.grad is not None]
    if not grads:
        return 0.0
    device = grads[0][0].device
    sharded = torch.zeros((), dtype=torch.float64, device=device)
    replicated = torch.zeros((), dtype=torch.float64, device=device)
    for g, dim in grads:
        sq = g.detach().double().pow(2).sum()
        if dim is None:
            replicated += sq
        else:
            sharded += sq
    comm.all_reduce(sharded)
    total = float((sharded + replicated).sqrt())
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g, _ in grads:
            g.mul_(scale)
    return total
