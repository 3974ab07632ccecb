"""Blockwise int4 codec: two values per byte, one fp32 scale per block.

Per block ``b``: ``scale_b = absmax_b / 7``; each value is sent as ``round(x / scale_b)``
in [-7, 7], stored offset by 8 in one nibble (low nibble first; a payload with a nibble
of 0 is refused, since no encoder writes one). Decoding multiplies back, so every
element's error is at most ``absmax_b / 14`` (half a quantisation step),
up to fp32 rounding, while the scale is a normal fp32 number (blocks whose largest value is
below about 1e-37 lose precision to subnormal scales: an absolute error under 1e-38).
All-zero blocks get scale 0 and decode to exact zeros.

Wire: ``ceil(n / 2)`` bytes + ``ceil(n / block_size)`` fp32 scales, a ratio of
``0.125 + 1 / block_size`` against fp32 (0.129 with the default 256-value blocks). Meant
for DiLoCo pseudo-gradients, where a round's bytes decide how often a swarm can sync;
small blocks keep one outlier from flattening a large neighbourhood to zero.
"""

from __future__ import annotations

import torch

from shoal.compress.codec import Encoded
from shoal.errors import ConfigError

__all__ = ["Int4BlockwiseCodec"]

_QMAX = 7.0
_OFFSET = 8
# Work on about 1 Mi elements at a time: temporaries stay small and in cache (a 1B-value
# pseudo-gradient would otherwise need several full-size float copies).
_CHUNK_ELEMENTS = 1 << 20


class Int4BlockwiseCodec:
    """Stateless blockwise absmax int4 quantiser (nibble-packed)."""

    name = "int4"

    def __init__(self, block_size: int = 256) -> None:
        if (
            not isinstance(block_size, int)
            or block_size < 2
            or block_size % 2
            or block_size > 1 << 24
        ):
            raise ConfigError(f"block_size must be an even int in [2, 2**24], got {block_size!r}")
        self.block_size = block_size

    def _chunks(self, n: int) -> list[tuple[int, int, int, int]]:
        """``(first block, end block, first value, end value)`` of each piece of work."""
        bs = self.block_size
        n_blocks = -(-n // bs)
        step = max(1, _CHUNK_ELEMENTS // bs)
        return [
            (b0, min(n_blocks, b0 + step), b0 * bs, min(n, (b0 + step) * bs))
            for b0 in range(0, n_blocks, step)
        ]

    def encode(self, tensor: torch.Tensor, state: object | None = None) -> Encoded:
        flat = tensor.detach().reshape(-1)
        if flat.dtype != torch.float32:
            flat = flat.float()
        n = flat.numel()
        bs = self.block_size
        scales = torch.empty(-(-n // bs), dtype=torch.float32)
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
        for b0, b1, lo, hi in self._chunks(n):
            piece = flat[lo:hi]
            full = (b1 - b0) * bs
            if hi - lo < full:  # the last block is partial: zeros (they decode to zero)
                piece = torch.nn.functional.pad(piece, (0, full - (hi - lo)))
            blocks = piece.view(b1 - b0, bs)
            absmax = blocks.abs().amax(dim=1)
            torch.div(absmax, _QMAX, out=scales[b0:b1])
            # Divide (see int8.py): _QMAX / absmax overflows for tiny blocks, 0 * inf = NaN.
            divisor = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
            scaled = (blocks / divisor.unsqueeze(1)).mul_(_QMAX)
            scaled.round_().clamp_(-_QMAX, _QMAX).add_(_OFFSET)
            # A block with a NaN or inf has a non-finite scale: write zeros (not the 0 a NaN
            # casts to), so it decodes to NaN (0 x inf) and the sender is screened as such.
            scaled.nan_to_num_(nan=_OFFSET)
            count = hi - lo
            q = scaled.view(-1)[: count + count % 2].to(torch.uint8)  # lo is even: bs is
            packed[lo // 2 : lo // 2 + q.numel() // 2] = q[0::2] | (q[1::2] << 4)
        return Encoded(self.name, tuple(tensor.shape), (packed, scales), {"block_size": bs})

    def decode(self, encoded: Encoded) -> torch.Tensor:
        packed, scales = encoded.payload
        bs = int(encoded.meta["block_size"])
        n = encoded.numel
        out = torch.empty(n, dtype=torch.float32)
        codec = self if bs == self.block_size else Int4BlockwiseCodec(bs)
        for b0, b1, lo, hi in codec._chunks(n):
            nib = packed[lo // 2 : (hi + 1) // 2]
            low, high = nib & 0x0F, nib >> 4
            if nib.numel() and min(int(low.min()), int(high.min())) == 0:
                # The encoder writes 1..15 (padding too): a 0 would decode to -8 steps, past
                # the block's absmax.
                raise ValueError("int4 payload holds nibble 0, which no encoder writes")
            values = torch.zeros((b1 - b0) * bs, dtype=torch.float32)
            body = values[: 2 * nib.numel()]
            body[0::2] = low
            body[1::2] = high
            values[: hi - lo].sub_(_OFFSET)
            values.view(b1 - b0, bs).mul_(scales[b0:b1].unsqueeze(1))
            out[lo:hi] = values[: hi - lo]
        return out.reshape(encoded.shape)
