"""The pipeline's arithmetic in one process, to measure what a boundary codec costs in loss.

``boundary(x, codec)`` is an autograd function whose forward is what the next stage receives
(``decode(encode(x))``) and whose backward is what the previous stage receives for a gradient
``g`` (``decode(encode(g))``): exactly what crosses the wire in ``Stage/Forward`` and
``Stage/Backward``. ``train_and_evaluate`` trains the stages step-synchronously (as the
pipeline does with one step per ``accumulate`` micro-batches and no staleness) with the codec
at every boundary, then reports the validation loss; the benchmark compares codecs on the same
batches and the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from shoal.models import ModelConfig
from shoal.parallel.pipeline.codecs import BoundaryCodec
from shoal.parallel.pipeline.model import build_stages

__all__ = ["boundary", "train_and_evaluate"]

Batch = tuple[torch.Tensor, torch.Tensor]


class _Boundary(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, codec: BoundaryCodec) -> torch.Tensor:
        ctx.codec = codec
        return codec.roundtrip(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.codec.roundtrip(grad), None


def boundary(x: torch.Tensor, codec: BoundaryCodec) -> torch.Tensor:
    """``x`` as the next stage sees it; gradients as the previous stage sees them."""
    out: torch.Tensor = _Boundary.apply(x, codec)
    return out


def train_and_evaluate(
    cfg: ModelConfig,
    num_stages: int,
    codec: str,
    train: Sequence[Batch],
    val: Sequence[Batch],
    *,
    lr: float,
    accumulate: int,
    seed: int,
    rank: int,
    block_size: int = 256,
) -> float:
    """Mean validation loss after training on ``train`` with ``codec`` at every boundary."""
    stages = build_stages(cfg, num_stages, seed)
    codecs = [
        BoundaryCodec(codec, cfg.d_model, b, rank=rank, block_size=block_size, seed=seed)
        for b in range(num_stages - 1)
    ]
    params = [p for st in stages for p in st.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x.long()
        for k, st in enumerate(stages[:-1]):
            h = boundary(st(h), codecs[k])
        return stages[-1](h, y.long())  # type: ignore[no-any-return]

    for i, (x, y) in enumerate(train):
        (loss_of(x, y) / accumulate).backward()
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        return sum(float(loss_of(x, y)) for x, y in val) / max(1, len(val))
