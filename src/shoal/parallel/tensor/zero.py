"""AdamW with the state of replicated parameters sharded over the group (ZeRO stage 1).

In a tensor-parallel model most parameters are already split (``tp_shard_dim``): each rank
keeps AdamW state for its own shards, as a dense optimizer would. The replicated ones
(embedding, norms, row-parallel biases) have identical gradients on every rank, so keeping
their AdamW state on every rank is waste. ``ZeroAdamW`` flattens them into one buffer per
weight-decay class, pads it to a multiple of the group size, and gives rank r the slice
``[r*c, (r+1)*c)``. A step is:

1. copy this rank's slice of the replicated parameters and gradients into its flat shard gradient
   (no communication: the gradients are already complete and identical on all ranks; with
   data parallelism inside the group this would be a reduce-scatter);
2. one ``torch.optim.AdamW`` step over the flat shards and the tensor-parallel shards;
3. all-gather the updated flat shards and copy them back into the parameters.

AdamW is elementwise, so the flattened update is the same arithmetic as the dense one.
Weight decay follows ``shoal.train``: matrices decay, biases and norm gains do not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from shoal.errors import ConfigError
from shoal.parallel.tensor.comm import TPComm
from shoal.parallel.tensor.layers import tp_shard_dim

__all__ = ["FlatShard", "ZeroAdamW"]


def _decays(p: torch.Tensor) -> bool:
    return p.dim() >= 2


class FlatShard:
    """This rank's slice of a flat view over a list of replicated parameters."""

    def __init__(self, params: list[nn.Parameter], comm: TPComm) -> None:
        self.params = params
        self.comm = comm
        self.numel = sum(p.numel() for p in params)
        self.chunk = math.ceil(self.numel / comm.world_size) if self.numel else 0
        self.lo = min(comm.rank * self.chunk, self.numel)
        self.hi = min(self.lo + self.chunk, self.numel)
        like = params[0] if params else torch.empty(0)
        shard = torch.zeros(self.chunk, dtype=like.dtype, device=like.device)
        self._copy_params_out(shard, lambda p: p.detach())
        self.shard = nn.Parameter(shard)

    def _overlaps(self) -> Iterable[tuple[nn.Parameter, int, int, int]]:
        """(param, start in param, start in shard, length) for each overlap with [lo, hi)."""
        offset = 0
        for p in self.params:
            n = p.numel()
            a, b = max(offset, self.lo), min(offset + n, self.hi)
            if a < b:
                yield p, a - offset, a - self.lo, b - a
            offset += n

    def _copy_params_out(
        self, dst: torch.Tensor, get: Callable[[nn.Parameter], torch.Tensor | None]
    ) -> None:
        for p, ps, ss, n in self._overlaps():
            src = get(p)
            if src is None:
                dst[ss : ss + n].zero_()
            else:
                dst[ss : ss + n].copy_(src.reshape(-1)[ps : ps + n])

    @torch.no_grad()
    def load(self) -> None:
        """Refresh the shard from the parameters and its grad from theirs (missing: zeros).

        Re-reading the values makes outside changes to the parameters (a loaded checkpoint,
        swarm averaging) visible to the next step.
        """
        self._copy_params_out(self.shard.data, lambda p: p.detach())
        if self.shard.grad is None:
            self.shard.grad = torch.zeros_like(self.shard)
        self.shard.grad.zero_()
        self._copy_params_out(self.shard.grad, lambda p: p.grad)

    @torch.no_grad()
    def publish(self) -> None:
        """All-gather the updated shards and write them into every parameter (collective)."""
        if not self.numel:
            return
        full = torch.empty(
            self.chunk * self.comm.world_size, dtype=self.shard.dtype, device=self.shard.device
        )
        self.comm.all_gather(list(full.split(self.chunk)), self.shard.detach())
        offset = 0
        for p in self.params:
            n = p.numel()
            p.copy_(full[offset : offset + n].view_as(p))
            offset += n


class ZeroAdamW:
    """AdamW over a tensor-parallel model with ZeRO-1 sharding of the replicated state.

    Args:
        params: the model's parameters (the same list, in the same order, on every rank).
        comm: the tensor-parallel group.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        decays: which parameters get weight decay; default: tensors with ``dim() >= 2``.

    Raises:
        ConfigError: a hyper-parameter out of range.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        comm: TPComm,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decays: Callable[[torch.Tensor], bool] = _decays,
    ) -> None:
        if not lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {lr!r}")
        if not weight_decay >= 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {weight_decay!r}")
        self.comm = comm
        self.params = [p for p in params if p.requires_grad]
        replicated = [p for p in self.params if tp_shard_dim(p) is None]
        sharded = [p for p in self.params if tp_shard_dim(p) is not None]
        self.flats = [
            FlatShard([p for p in replicated if decays(p)], comm),
            FlatShard([p for p in replicated if not decays(p)], comm),
        ]
        decay = [p for p in sharded if decays(p)] + [self.flats[0].shard]
        no_decay = [p for p in sharded if not decays(p)] + [self.flats[1].shard]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=lr,
            betas=betas,
            eps=eps,
        )

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step on every parameter (collective: all ranks call it together)."""
        for flat in self.flats:
            flat.load()
        self.optimizer.step()
        for flat in self.flats:
            flat.publish()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for flat in self.flats:
            flat.shard.grad = None

    def state_bytes(self) -> int:
        """Bytes of AdamW state (moments and step counters) held by this rank."""
        total = 0
        for state in self.optimizer.state.values():
            total += sum(
                t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor)
            )
        return total

    def shard_bytes(self) -> int:
        """Bytes of the flat parameter shards this rank keeps besides the model."""
        return sum(f.shard.numel() * f.shard.element_size() for f in self.flats)

    def state_dict(self) -> dict[str, Any]:
        """This rank's optimizer state (each rank saves its own)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
