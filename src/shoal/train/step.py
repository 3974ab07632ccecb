"""One optimizer step: gradients over micro-batches, then the update.

``StepFunction`` is the seam where parallel strategies plug in. The local trainer uses it as
is; a data-parallel run passes ``reduce_grads`` (average gradients across peers after
backward, before clipping), and a DiLoCo run can pass ``after_update`` (an outer step every
H inner steps). The loop around it (``shoal.train.trainer``) does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Batch", "StepFunction", "StepResult"]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one optimizer step produced."""

    loss: torch.Tensor
    """Mean training loss over the micro-batches (0-dim, detached; nats per byte)."""
    grad_norm: torch.Tensor | None
    """Global gradient norm before clipping, when clipping is on."""


class StepFunction:
    """Forward/backward over micro-batches, optional gradient reduction, clip, AdamW update."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        grad_clip: float,
        autocast: Callable[[], ContextManager[object]],
        reduce_grads: Callable[[nn.Module], None] | None = None,
        after_update: Callable[[int], None] | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.grad_clip = grad_clip
        self.autocast = autocast
        self.reduce_grads = reduce_grads
        self.after_update = after_update
        self._params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, step: int, batches: Sequence[Batch], lr: float) -> StepResult:
        """Run optimizer step number ``step`` (0-based) at learning rate ``lr``."""
        n = len(batches)
        total = torch.zeros((), device=self.device)
        for x, y in batches:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with self.autocast():
                loss = self.model(x, y)
            (loss / n if n > 1 else loss).backward()
            total += loss.detach()
        if self.reduce_grads is not None:
            self.reduce_grads(self.model)
        norm = None
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.after_update is not None:
            self.after_update(step)
        return StepResult(loss=total / n, grad_norm=norm)
