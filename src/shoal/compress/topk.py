"""Top-k sparsification with error feedback.

``encode`` keeps the ``k`` largest-magnitude coordinates of ``tensor + residual`` and
sends them as (int32/int64 indices, fp32 values); everything not sent stays in the
:class:`ErrorFeedback` residual and is added to the next tensor. Hence, for any sequence
of inputs, ``sum(decoded) + residual == sum(inputs)`` (up to fp32 rounding): nothing is
lost, only delayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shoal.compress.codec import Encoded
from shoal.errors import ConfigError

__all__ = ["ErrorFeedback", "TopKCodec"]


@dataclass(slots=True)
class ErrorFeedback:
    """What earlier encodes did not send; owned by the caller, one per tensor stream."""

    residual: torch.Tensor | None = None

    def reset(self) -> None:
        self.residual = None


class TopKCodec:
    """Keep ``k`` coordinates: ``k = max(1, round(fraction * numel))`` or a fixed ``k``."""

    name = "topk"

    def __init__(self, *, fraction: float | None = None, k: int | None = None) -> None:
        if (fraction is None) == (k is None):
            raise ConfigError(f"give exactly one of fraction or k, got {fraction=!r} {k=!r}")
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise ConfigError(f"fraction must be in (0, 1], got {fraction!r}")
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ConfigError(f"k must be a positive int, got {k!r}")
        self.fraction = fraction
        self.k = k

    def k_for(self, numel: int) -> int:
        """How many coordinates are kept from a tensor of ``numel`` elements."""
        if self.k is not None:
            return min(self.k, numel)
        assert self.fraction is not None
        return min(numel, max(1, round(self.fraction * numel)))

    def encode(self, tensor: torch.Tensor, state: object | None = None) -> Encoded:
        if state is not None and not isinstance(state, ErrorFeedback):
            raise TypeError(f"TopKCodec state must be ErrorFeedback, got {type(state).__name__}")
        flat = tensor.detach().reshape(-1).to(torch.float32)
        if state is not None and state.residual is not None:
            if state.residual.numel() != flat.numel():
                raise ValueError(
                    f"residual has {state.residual.numel()} elements, tensor {flat.numel()}"
                )
            acc = flat + state.residual
        else:
            acc = flat.clone() if state is not None else flat
        n = acc.numel()
        k = self.k_for(n)
        if n == 0:
            indices = torch.empty(0, dtype=torch.int64)
        else:
            indices = torch.topk(acc.abs(), k, sorted=False).indices
        values = acc[indices]
        if state is not None:
            acc[indices] = 0.0
            state.residual = acc
        index_dtype = torch.int32 if n < 2**31 else torch.int64
        return Encoded(self.name, tuple(tensor.shape), (indices.to(index_dtype), values))

    def decode(self, encoded: Encoded) -> torch.Tensor:
        indices, values = encoded.payload
        out = torch.zeros(encoded.numel, dtype=torch.float32)
        out[indices.long()] = values
        return out.reshape(encoded.shape)
