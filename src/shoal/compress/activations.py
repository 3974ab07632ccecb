"""Subspace codec for activations crossing a pipeline boundary (rank ``r`` << width ``d``).

Both sides of a boundary derive the same orthonormal basis ``U`` (d x r) from a seed (QR of a
seeded Gaussian matrix), so the basis never travels. The sender sends the coefficients
``c = x U`` (..., r); the receiver reconstructs ``x_hat = c U^T`` (..., d), the orthogonal
projection of ``x`` onto the subspace. The projection ``P = U U^T`` is symmetric, so the
gradient that flows back through it is ``P g``: gradients travel the same way (coefficients
``g U``) and the backward pass is exact for the model that includes the projection. The
constraint changes the model (information outside the subspace does not cross the
boundary); the training run measures what that costs.

Ratio against fp32: ``r / d`` (coefficients in fp32); stack with int8 for ``~r / (4 d)``.
"""

from __future__ import annotations

import torch

from shoal.compress.codec import Encoded
from shoal.errors import ConfigError

__all__ = ["SubspaceCodec", "subspace_basis"]


def subspace_basis(dim: int, rank: int, seed: int) -> torch.Tensor:
    """A (dim, rank) matrix with orthonormal columns, identical for identical arguments."""
    if not 0 < rank <= dim:
        raise ConfigError(f"subspace rank must be in [1, {dim}], got {rank!r}")
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, rank, generator=gen, dtype=torch.float64))
    return q.to(torch.float32).contiguous()


class SubspaceCodec:
    """Projects the last dimension onto a fixed seeded basis (see the module docstring)."""

    name = "subspace"

    def __init__(self, dim: int, rank: int, seed: int) -> None:
        self.dim, self.rank, self.seed = dim, rank, seed
        self.basis = subspace_basis(dim, rank, seed)  # (d, r)

    def encode(self, tensor: torch.Tensor, state: object | None = None) -> Encoded:
        if tensor.shape[-1] != self.dim:
            raise ConfigError(f"last dimension {tensor.shape[-1]} != codec width {self.dim}")
        coeffs = (tensor.detach().float() @ self.basis).contiguous()  # (..., r)
        return Encoded(
            self.name, tuple(tensor.shape), (coeffs,), {"rank": self.rank, "seed": self.seed}
        )

    def decode(self, encoded: Encoded) -> torch.Tensor:
        (coeffs,) = encoded.payload
        return coeffs.float() @ self.basis.T  # (..., d)

    def project(self, tensor: torch.Tensor) -> torch.Tensor:
        """``x U U^T`` without the round trip (what the receiver would reconstruct)."""
        return (tensor @ self.basis) @ self.basis.T
