"""Sparse wire codec: the non-zero values of a tensor and where they are, exactly.

For vectors that are mostly zeros, such as top-k pseudo-gradients (``topk.py`` picks the
values, this codec carries them) and their averages. Lossless: a tensor decodes to exactly
what was encoded (-0.0 comes back as 0.0). Two layouts, chosen per tensor by size:

- *sparse*: ``(indices, values)``: strictly increasing int32 positions in the flattened
  tensor and their fp32 values, 8 bytes per non-zero;
- *dense*: ``(values,)``: all fp32 values, when half or more of them are non-zero (the
  average of several peers' top-k vectors can fill up), so a part never costs more than
  fp32.

NaN and inf count as non-zero and travel as they are, so a diverged sender is still
screened out downstream. A decoder checks the layout, that positions are in range and
strictly increasing, and that the sparse layout holds fewer than half the values
(``check_sparse``) before it allocates anything.
"""

from __future__ import annotations

import torch

from shoal.compress.codec import Encoded

__all__ = ["SparseCodec", "check_sparse"]

MAX_SPARSE_NUMEL = 2**31 - 1
"""Positions are int32."""


def _position_layout(nonzero: int, numel: int) -> bool:
    """Whether ``nonzero`` values of ``numel`` travel as (position, value) pairs: fewer than
    half of them, else all values are cheaper (the one rule of encoder and checker)."""
    return 2 * nonzero < numel


def check_sparse(numel: int, payload: tuple[torch.Tensor, ...]) -> None:
    """Raise ValueError unless ``payload`` is one of the two layouts for ``numel`` values:
    ``(values,)`` with all of them in fp32, or ``(indices, values)`` with fewer than half of
    them (what the encoder sends): int32 positions in ``[0, numel)``, strictly increasing,
    one fp32 value each. Nothing is allocated before it passes."""
    if len(payload) == 1:
        if payload[0].dtype != torch.float32 or payload[0].numel() != numel:
            raise ValueError(f"the dense layout must be {numel} float32 values")
        return
    if len(payload) != 2:
        raise ValueError(f"a sparse payload holds 1 or 2 tensors, not {len(payload)}")
    indices, values = payload
    if indices.dtype != torch.int32 or values.dtype != torch.float32:
        raise ValueError(
            f"sparse payload must be int32 + float32, got {indices.dtype}, {values.dtype}"
        )
    if indices.dim() != 1 or values.dim() != 1 or indices.numel() != values.numel():
        raise ValueError(f"{indices.numel()} positions for {values.numel()} values")
    if not _position_layout(indices.numel(), numel):
        raise ValueError(f"{indices.numel()} positions for a tensor of {numel} values")
    if indices.numel() == 0:
        return
    if int(indices[0]) < 0 or int(indices[-1]) >= numel:
        raise ValueError(f"positions outside [0, {numel})")
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise ValueError("positions are not strictly increasing")


class SparseCodec:
    """Stateless, lossless codec for mostly-zero fp32 tensors (see module docstring)."""

    name = "sparse"

    def encode(self, tensor: torch.Tensor, state: object | None = None) -> Encoded:
        flat = tensor.detach().reshape(-1)
        if flat.dtype != torch.float32:
            flat = flat.float()
        n = flat.numel()
        if n > MAX_SPARSE_NUMEL:
            raise ValueError(f"a sparse tensor holds at most {MAX_SPARSE_NUMEL} values, got {n}")
        indices = flat.nonzero().reshape(-1)  # increasing; NaN and inf are non-zero
        if not _position_layout(indices.numel(), n):
            return Encoded(self.name, tuple(tensor.shape), (flat.contiguous(),))
        values = flat[indices]
        return Encoded(self.name, tuple(tensor.shape), (indices.to(torch.int32), values))

    def decode(self, encoded: Encoded) -> torch.Tensor:
        n = encoded.numel
        check_sparse(n, encoded.payload)
        if len(encoded.payload) == 1:
            return encoded.payload[0].reshape(encoded.shape)
        indices, values = encoded.payload
        out = torch.zeros(n, dtype=torch.float32)
        out[indices.long()] = values
        return out.reshape(encoded.shape)
