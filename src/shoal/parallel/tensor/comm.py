"""The tensor-parallel process group and the two communication operators "f" and "g".

``TPComm`` wraps one ``torch.distributed`` process group (gloo on CPU, NCCL on GPU) with the
few collectives tensor parallelism needs. The autograd operators follow Megatron-LM:

* ``copy_to_tp`` ("f"): identity in forward, all-reduce (sum) of the gradient in backward.
  Placed where a replicated activation enters column-parallel layers: each rank produces a
  partial input gradient and the full one is their sum.
* ``reduce_from_tp`` ("g"): all-reduce (sum) in forward, identity in backward. Placed after
  row-parallel layers: each rank holds a partial output and the gradient of the sum is the
  same on every rank.

All-reduce returns bit-identical tensors on every rank (gloo and NCCL both finish with an
all-gather of the reduced parts), so replicated activations, and therefore the gradients of
replicated parameters, stay bit-identical across the group without further synchronisation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["TPComm", "copy_to_tp", "reduce_from_tp"]


class TPComm:
    """The collectives of one tensor-parallel group.

    Args:
        group: the process group (``None`` means the default group).
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    @property
    def backend(self) -> str:
        return str(dist.get_backend(self.group))

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group in place and return it (a no-op for one rank)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_reduce_async(self, tensor: torch.Tensor) -> Any:
        """Start an in-place sum; returns a work handle with ``wait()`` (or ``None``)."""
        if self.world_size == 1:
            return None
        return dist.all_reduce(tensor, group=self.group, async_op=True)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` on every rank with rank ``src``'s copy (group-local rank)."""
        if self.world_size > 1:
            dist.broadcast(tensor, group_src=src, group=self.group)
        return tensor

    def all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor) -> None:
        """Fill ``outputs[r]`` with rank r's ``tensor`` (equal shapes on every rank)."""
        if self.world_size == 1:
            outputs[0].copy_(tensor)
            return
        dist.all_gather(outputs, tensor, group=self.group)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)


class _CopyToTP(torch.autograd.Function):
    """f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: TPComm) -> torch.Tensor:
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.comm.all_reduce(grad.contiguous()), None


class _ReduceFromTP(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: TPComm) -> torch.Tensor:
        return comm.all_reduce(x.contiguous().clone())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def copy_to_tp(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    """Megatron's "f" (see the module docstring)."""
    return _CopyToTP.apply(x, comm)  # type: ignore[no-any-return]


def reduce_from_tp(x: torch.Tensor, comm: TPComm) -> torch.Tensor:
    """Megatron's "g" (see the module docstring)."""
    return _ReduceFromTP.apply(x, comm)  # type: ignore[no-any-return]
