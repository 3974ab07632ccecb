"""Validation in bits per byte."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager

import torch
from torch import nn

from shoal.train.step import Batch

__all__ = ["evaluate_bpb"]


@torch.no_grad()
def evaluate_bpb(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    device: torch.device,
    autocast: Callable[[], ContextManager[object]],
) -> float:
    """Mean next-byte cross-entropy over ``batches``, in bits per byte."""
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        for x, y in batches:
            with autocast():
                loss = model(x.to(device), y.to(device))
            total += loss.double() * y.numel()
            count += y.numel()
    finally:
        model.train(was_training)
    return float(total) / max(1, count) / math.log(2)
