"""Column- and row-parallel linears, and the tensor-parallel attention and MLP built from them.

Layout (Megatron-LM). For a dense ``nn.Linear`` with weight (out, in):

* ``ColumnParallelLinear`` keeps rows ``[r*out/N, (r+1)*out/N)`` of the weight and bias on
  rank r; its input is replicated and its output is split along the last dimension.
* ``RowParallelLinear`` keeps columns ``[r*in/N, (r+1)*in/N)`` of the weight; its input is
  split, each rank computes a partial product, ``reduce_from_tp`` ("g") sums them, and the
  (replicated) bias is added once after the sum.

Attention splits whole heads: q/k/v are column-parallel (rows of a head are contiguous), so
rank r computes heads ``[r*nh/N, (r+1)*nh/N)`` locally and ``o`` is row-parallel. The MLP is
``fc_in`` column-parallel, GELU, ``fc_out`` row-parallel. One forward all-reduce and one
backward all-reduce per sub-layer.

Sharded parameters carry ``tp_shard_dim`` (0 or 1); every other parameter is replicated.

Overlap. The backward of the column-parallel projections (which contains Megatron's "f")
starts the all-reduce of the input gradient asynchronously and computes the weight gradients
while it runs (``async_grad_allreduce``). The forward all-reduce after a row-parallel layer
cannot overlap: the residual add right after it is its only consumer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shoal.errors import ConfigError
from shoal.models.gpt import MLP, Attention, Rotary
from shoal.parallel.tensor.comm import TPComm, reduce_from_tp

__all__ = [
    "TPMLP",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "TPAttention",
    "column_parallel",
    "tp_shard_dim",
]

SHARD_ATTR = "tp_shard_dim"


def tp_shard_dim(p: torch.Tensor) -> int | None:
    """The dimension ``p`` is split along across the group, or ``None`` if replicated."""
    return getattr(p, SHARD_ATTR, None)


def _shard(t: torch.Tensor, dim: int, comm: TPComm) -> nn.Parameter:
    size = t.shape[dim]
    if size % comm.world_size != 0:
        raise ConfigError(f"tensor dim {dim} of size {size} does not split into {comm.world_size}")
    part = t.detach().chunk(comm.world_size, dim=dim)[comm.rank].clone()
    p = nn.Parameter(part, requires_grad=t.requires_grad)
    setattr(p, SHARD_ATTR, dim)
    return p


class _ColumnParallelFn(torch.autograd.Function):
    """y_i = x W_i^T + b_i for several column-parallel linears sharing one replicated input."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx: Any, x: torch.Tensor, comm: TPComm, overlap: bool, *wb: Any) -> Any:
        weights, biases = wb[0::2], wb[1::2]
        ctx.comm, ctx.overlap = comm, overlap
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(x, *weights)
        return tuple(F.linear(x, w, b) for w, b in zip(weights, biases, strict=True))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        x, *weights = ctx.saved_tensors
        grad_x = work = None
        if ctx.needs_input_grad[0]:
            grad_x = grads[0] @ weights[0]  # (..., in)
            for g, w in zip(grads[1:], weights[1:], strict=True):
                grad_x = grad_x + g @ w
            grad_x = grad_x.contiguous()
            if ctx.overlap:
                work = ctx.comm.all_reduce_async(grad_x)
            else:
                ctx.comm.all_reduce(grad_x)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        out: list[torch.Tensor | None] = []
        for i, (g, has_b) in enumerate(zip(grads, ctx.has_bias, strict=True)):
            g2 = g.reshape(-1, g.shape[-1])  # (N, out_local)
            out.append(g2.t() @ x2.to(g2.dtype) if ctx.needs_input_grad[3 + 2 * i] else None)
            if has_b and ctx.needs_input_grad[4 + 2 * i]:  # sum bf16 grads in fp32 at least
                acc = torch.promote_types(g2.dtype, torch.float32)
                out.append(g2.sum(0, dtype=acc).to(g2.dtype))
            else:
                out.append(None)
        if work is not None:
            work.wait()
        return (grad_x, None, None, *out)


def column_parallel(
    x: torch.Tensor, comm: TPComm, layers: Sequence[ColumnParallelLinear], *, overlap: bool = True
) -> tuple[torch.Tensor, ...]:
    """Apply several column-parallel linears to one replicated input ``x`` (includes "f")."""
    wb: list[torch.Tensor | None] = []
    for layer in layers:
        wb += [layer.weight, layer.bias]
    return _ColumnParallelFn.apply(x, comm, overlap, *wb)  # type: ignore[no-any-return]


class ColumnParallelLinear(nn.Module):
    """Rank r's row block of a dense linear; replicated input, split output."""

    def __init__(self, dense: nn.Linear, comm: TPComm, *, overlap: bool = True) -> None:
        super().__init__()
        self.comm, self.overlap = comm, overlap
        self.weight = _shard(dense.weight, 0, comm)  # (out/N, in)
        self.bias = _shard(dense.bias, 0, comm) if dense.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return column_parallel(x, self.comm, [self], overlap=self.overlap)[0]


class RowParallelLinear(nn.Module):
    """Rank r's column block of a dense linear; split input, replicated (summed) output."""

    def __init__(self, dense: nn.Linear, comm: TPComm) -> None:
        super().__init__()
        self.comm = comm
        self.weight = _shard(dense.weight, 1, comm)  # (out, in/N)
        self.bias = (
            nn.Parameter(dense.bias.detach().clone(), requires_grad=dense.bias.requires_grad)
            if dense.bias is not None
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(F.linear(x, self.weight), self.comm)  # (..., out), full sum
        return y + self.bias if self.bias is not None else y


class TPAttention(nn.Module):
    """Causal self-attention over this rank's heads; drop-in for ``models.gpt.Attention``."""

    def __init__(self, dense: Attention, comm: TPComm, *, overlap: bool = True) -> None:
        super().__init__()
        if dense.n_head % comm.world_size != 0:
            raise ConfigError(
                f"model.n_head={dense.n_head} is not divisible by tp={comm.world_size}"
            )
        self.comm, self.overlap = comm, overlap
        self.n_head = dense.n_head // comm.world_size  # local heads
        self.head_dim = dense.q.out_features // dense.n_head
        self.dropout = dense.dropout
        self.q = ColumnParallelLinear(dense.q, comm, overlap=overlap)
        self.k = ColumnParallelLinear(dense.k, comm, overlap=overlap)
        self.v = ColumnParallelLinear(dense.v, comm, overlap=overlap)
        self.o = RowParallelLinear(dense.o, comm)

    def forward(self, x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, C)
        nh, hs = self.n_head, self.head_dim
        q, k, v = column_parallel(x, self.comm, [self.q, self.k, self.v], overlap=self.overlap)
        q = q.view(b, t, nh, hs).transpose(1, 2)  # (B, nh/N, T, hs)
        k = k.view(b, t, nh, hs).transpose(1, 2)
        v = v.view(b, t, nh, hs).transpose(1, 2)
        q, k = rotary.rotate(q), rotary.rotate(k)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).reshape(b, t, nh * hs)  # (B, T, C/N)
        return self.o(y)  # (B, T, C)


class TPMLP(nn.Module):
    """fc_in (column) -> GELU -> fc_out (row); drop-in for ``models.gpt.MLP``."""

    def __init__(self, dense: MLP, comm: TPComm, *, overlap: bool = True) -> None:
        super().__init__()
        self.fc_in = ColumnParallelLinear(dense.fc_in, comm, overlap=overlap)
        self.fc_out = RowParallelLinear(dense.fc_out, comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))  # (B, T, C)
