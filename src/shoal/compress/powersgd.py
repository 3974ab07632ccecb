"""Low-rank (PowerSGD-style) compression with a warm-started basis and error feedback.

A tensor of two or more dimensions is viewed as a matrix ``M`` (first dimension x the
rest). One power-iteration step on ``M' = M + residual``:

    P = orth(M' Q)      (n x r, orthonormal columns)
    Q = M'^T P          (m x r, kept in the state: next call starts from it)
    decoded = P Q^T     residual = M' - decoded

Only ``P`` and ``Q`` cross the wire: ``r (n + m)`` floats instead of ``n m``. A matrix of
rank ``<= r`` is reproduced exactly (up to fp32 rounding). Zero- and one-dimensional
tensors, empty matrices and matrices whose factors would not be smaller than the matrix
(``r (n + m) >= n m``, e.g. a 4 x 4 at rank 2) are sent dense: exactly, with the residual
folded in and cleared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shoal.compress.codec import Encoded
from shoal.errors import ConfigError

__all__ = ["PowerSGDCodec", "PowerSGDState"]


@dataclass(slots=True)
class PowerSGDState:
    """Per-tensor memory: the warm-start basis ``q`` and the error-feedback residual."""

    q: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    seed: int = 0


class PowerSGDCodec:
    """Rank-``rank`` factorisation with one power iteration per encode."""

    name = "powersgd"

    def __init__(self, rank: int = 4) -> None:
        if not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"rank must be a positive int, got {rank!r}")
        self.rank = rank

    def encode(self, tensor: torch.Tensor, state: object | None = None) -> Encoded:
        if state is None:
            state = PowerSGDState()
        if not isinstance(state, PowerSGDState):
            raise TypeError(f"PowerSGDCodec state must be PowerSGDState, got {type(state)}")
        shape = tuple(tensor.shape)
        if tensor.dim() < 2:  # the residual goes out with it, as with a dense matrix
            dense = tensor.detach().reshape(-1).to(torch.float32).clone()
            if state.residual is not None and state.residual.numel() == dense.numel():
                dense += state.residual.reshape(-1)
            state.residual = None
            return Encoded(self.name, shape, (dense,), {"dense": 1})
        rest = 1
        for size in shape[1:]:
            rest *= size  # not reshape(n, -1): that is ambiguous when n is 0
        matrix = tensor.detach().reshape(shape[0], rest).to(torch.float32)
        if state.residual is not None:
            matrix = matrix + state.residual.reshape(matrix.shape)
        n, m = matrix.shape
        r = min(self.rank, n, m)
        if r * (n + m) >= n * m:  # includes n == 0 or m == 0: QR of an empty matrix fails
            state.residual = None
            return Encoded(self.name, shape, (matrix.reshape(-1).clone(),), {"dense": 1})
        q = state.q
        if q is None or tuple(q.shape) != (m, r):
            generator = torch.Generator().manual_seed(state.seed)
            q = torch.randn(m, r, generator=generator)
        p = torch.linalg.qr(matrix @ q, mode="reduced").Q
        q = matrix.T @ p
        state.q = q
        state.residual = matrix - p @ q.T
        return Encoded(self.name, shape, (p.contiguous(), q.contiguous()), {"dense": 0})

    def decode(self, encoded: Encoded) -> torch.Tensor:
        if encoded.meta.get("dense", 0):
            (dense,) = encoded.payload
            return dense.reshape(encoded.shape)
        p, q = encoded.payload
        return (p @ q.T).reshape(encoded.shape)
