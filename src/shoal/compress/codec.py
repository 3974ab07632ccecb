"""The one codec interface of Shoal and the encoded form every codec produces.

A codec turns a float tensor into an :class:`Encoded` value (payload tensors plus small
integer/float metadata) and back. Stateless codecs (fp16, int8 blockwise) are pure;
stateful codecs (top-k, PowerSGD) keep their memory in a small state object that the
caller owns and passes in, so one codec instance serves many tensors.

Vocabulary: *wire bytes* are the bytes of the payload tensors (what crosses the network,
headers aside); the *compression ratio* is wire bytes divided by the bytes of the same
tensor in fp32 (smaller is better).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

__all__ = ["Codec", "Encoded", "compression_ratio", "fp32_bytes"]


@dataclass(frozen=True, slots=True)
class Encoded:
    """A compressed tensor: what a codec sends and what it needs to decode.

    Attributes:
        codec: name of the codec that produced it (e.g. ``"int8"``).
        shape: shape of the original tensor.
        payload: tensors to put on the wire, in codec-defined order (contiguous, CPU).
        meta: small codec parameters needed to decode (e.g. block size), ints and floats.
    """

    codec: str
    shape: tuple[int, ...]
    payload: tuple[torch.Tensor, ...]
    meta: dict[str, int | float] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def wire_bytes(self) -> int:
        """Bytes of the payload tensors."""
        return sum(t.numel() * t.element_size() for t in self.payload)


@runtime_checkable
class Codec(Protocol):
    """Encode a float tensor into an :class:`Encoded` value and decode it back.

    ``state`` is ``None`` for stateless codecs; stateful codecs document their state type
    and create it with ``new_state(tensor)``.
    """

    name: str

    def encode(self, tensor: torch.Tensor, state: object | None = None) -> Encoded: ...

    def decode(self, encoded: Encoded) -> torch.Tensor: ...


def fp32_bytes(encoded: Encoded) -> int:
    """Bytes the original tensor would take in fp32."""
    return encoded.numel * 4


def compression_ratio(encoded: Encoded) -> float:
    """Wire bytes / fp32 bytes (0.5 for fp16, about 0.25 for int8)."""
    base = fp32_bytes(encoded)
    return encoded.wire_bytes / base if base else 0.0
