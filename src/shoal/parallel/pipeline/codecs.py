"""What crosses a stage boundary: activations forward, their gradients backward.

``BoundaryCodec(name, width, boundary, rank, block_size, seed)`` turns a (B, T, d) float
tensor into payload tensors and back. Boundary ``b`` lies between stage ``b`` and ``b + 1``;
both sides build the same codec from the run's configuration (the subspace basis is derived
from ``seed`` and ``b``, never sent).

=================  ===========================================  ======================
codec              payload                                      bytes vs fp32
=================  ===========================================  ======================
``none``           (B, T, d) float32                             1
``int8``           (B, T, d) int8 + per-block float32 scales      0.25 + 1/block
``subspace``       (B, T, r) float32 coefficients                 r / d
``subspace-int8``  (B, T, r) int8 + scales                        r / (4 d) + ...
=================  ===========================================  ======================

Gradients use the same codec; with the subspace the gradient crossing back is exactly the
gradient of the projected model (see ``shoal.compress.activations``). ``decode`` checks
every payload's dtype and shape before use and raises ProtocolViolation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shoal.compress.activations import SubspaceCodec
from shoal.compress.codec import Encoded
from shoal.compress.int8 import Int8BlockwiseCodec
from shoal.errors import ConfigError, ProtocolViolation
from shoal.parallel.pipeline.config import CODECS

__all__ = ["MAX_TOKENS", "BoundaryCodec", "payload_count"]

MAX_TOKENS = 1 << 22
"""Most (batch x sequence) positions one activation may carry."""


def payload_count(codec: str) -> int:
    """Tensors a codec's payload has."""
    return 2 if codec.endswith("int8") else 1


class BoundaryCodec:
    """Encoder/decoder of one boundary (see the module docstring)."""

    def __init__(
        self,
        name: str,
        width: int,
        boundary: int,
        *,
        rank: int = 16,
        block_size: int = 256,
        seed: int = 0,
    ) -> None:
        if name not in CODECS:
            raise ConfigError(f"codec must be one of {CODECS}, got {name!r}")
        self.name = name
        self.width = width
        self.int8 = Int8BlockwiseCodec(block_size) if name.endswith("int8") else None
        self.subspace = (
            SubspaceCodec(width, min(rank, width), seed * 1_000_003 + boundary)
            if name.startswith("subspace")
            else None
        )
        self.inner_width = self.subspace.rank if self.subspace is not None else width

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Payload tensors for ``x`` of shape (B, T, d)."""
        x = x.detach().float()
        if self.subspace is not None:
            x = self.subspace.encode(x).payload[0]  # (B, T, r)
        if self.int8 is None:
            return (x.contiguous(),)
        enc = self.int8.encode(x)
        q, scales = enc.payload
        return (q.reshape(x.shape), scales)

    def decode(self, payload: Sequence[torch.Tensor]) -> torch.Tensor:
        """The (B, T, d) float32 tensor back from its payload (validated)."""
        if len(payload) != payload_count(self.name):
            raise ProtocolViolation(
                f"codec {self.name} needs {payload_count(self.name)} tensors, got {len(payload)}"
            )
        first = payload[0]
        if first.dim() != 3 or first.shape[-1] != self.inner_width:
            raise ProtocolViolation(
                f"boundary tensor of shape {list(first.shape)}, want (B, T, {self.inner_width})"
            )
        if first.shape[0] * first.shape[1] > MAX_TOKENS:
            raise ProtocolViolation(f"boundary tensor of {list(first.shape)} exceeds limits")
        if self.int8 is not None:
            q, scales = payload
            bs = self.int8.block_size
            if (
                q.dtype != torch.int8
                or scales.dtype != torch.float32
                or scales.numel() != -(-q.numel() // bs)
            ):
                raise ProtocolViolation("malformed int8 boundary payload")
            x = self.int8.decode(
                Encoded(
                    "int8", tuple(q.shape), (q.reshape(-1), scales.reshape(-1)), {"block_size": bs}
                )
            ).reshape(q.shape)
        else:
            if first.dtype != torch.float32:
                raise ProtocolViolation(f"boundary tensor of dtype {first.dtype}, want float32")
            x = first
        if self.subspace is not None:
            x = self.subspace.decode(Encoded("subspace", tuple(x.shape), (x,)))
        return x

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """What the receiver of ``encode(x)`` sees (for reference models in tests)."""
        return self.decode(self.encode(x))
