"""Who reduces which slice of the flat parameter vector.

A group all-reduces one flat fp32 vector. It is cut into contiguous parts, one per
member; member ``i`` *reduces* part ``i``. Shares are proportional to each member's
measured bandwidth; members in *client mode* (relayed, or too slow to serve) get share 0:
they send their parts and receive results but reduce nothing.

``flatten`` views a list of tensors as one flat vector without copying when the tensors
already lie back to back in one storage (a flat parameter buffer); otherwise it copies,
and ``write_back`` copies results into the original tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from shoal.errors import ConfigError

__all__ = ["FlatVector", "flatten", "part_ranges", "shares_from_bandwidth", "split_sizes"]


def shares_from_bandwidth(
    bandwidths_bps: Sequence[float], client_mode: Sequence[bool] | None = None
) -> list[float]:
    """Fractions of the vector each member reduces (sum 1; clients and zero bandwidth get 0).

    Raises:
        ConfigError: lengths differ, a bandwidth is negative or not finite, or no member can
            reduce (every one is a client or has zero bandwidth).
    """
    n = len(bandwidths_bps)
    clients = list(client_mode) if client_mode is not None else [False] * n
    if len(clients) != n:
        raise ConfigError(f"client_mode has {len(clients)} entries for {n} bandwidths")
    for i, bw in enumerate(bandwidths_bps):
        if not math.isfinite(bw) or bw < 0:
            raise ConfigError(f"bandwidths_bps[{i}] must be finite and >= 0, got {bw!r}")
    usable = [
        0.0 if client else float(bw) for bw, client in zip(bandwidths_bps, clients, strict=True)
    ]
    total = sum(usable)
    if total <= 0:
        raise ConfigError("no member can reduce: all are clients or have zero bandwidth")
    return [u / total for u in usable]


def split_sizes(total: int, shares: Sequence[float]) -> list[int]:
    """Integer part sizes summing to ``total``, proportional to ``shares`` (largest remainder).

    A member with share 0 always gets size 0.
    """
    if total < 0:
        raise ConfigError(f"total must be >= 0, got {total}")
    weight = sum(shares)
    if weight <= 0 or any(s < 0 or not math.isfinite(s) for s in shares):
        raise ConfigError(f"shares must be finite, >= 0 and not all zero, got {list(shares)}")
    exact = [total * s / weight for s in shares]
    sizes = [math.floor(e) for e in exact]
    left = total - sum(sizes)
    order = sorted(
        (i for i, s in enumerate(shares) if s > 0), key=lambda i: (sizes[i] - exact[i], i)
    )
    for i in order[:left]:
        sizes[i] += 1
    return sizes


def part_ranges(total: int, shares: Sequence[float]) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of each member's part of a ``total``-element vector."""
    ranges = []
    start = 0
    for size in split_sizes(total, shares):
        ranges.append((start, start + size))
        start += size
    return ranges


class FlatVector:
    """A flat fp32 view of a list of tensors, copied only when they are not contiguous."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.tensors = list(tensors)
        if not self.tensors:
            raise ConfigError("cannot average an empty list of tensors")
        for i, t in enumerate(self.tensors):
            if t.dtype != torch.float32:
                raise ConfigError(f"tensors[{i}] has dtype {t.dtype}; averaging needs float32")
        self.flat, self.is_view = _flat_view(self.tensors)

    @property
    def numel(self) -> int:
        return self.flat.numel()

    def write_parts(
        self, ranges: Sequence[tuple[int, int]], parts: dict[int, torch.Tensor]
    ) -> None:
        """Store each ``parts[j]`` at ``ranges[j]`` of the flat vector, then into the tensors."""
        with torch.no_grad():
            for j, part in parts.items():
                a, b = ranges[j]
                self.flat[a:b].copy_(part)
        if not self.is_view:
            self.write_back(self.flat)

    def write_back(self, result: torch.Tensor) -> None:
        """Store a flat result of the same size into the original tensors."""
        if result.numel() != self.numel:
            raise ValueError(f"result has {result.numel()} elements, expected {self.numel}")
        if self.is_view:
            if result.data_ptr() != self.flat.data_ptr():
                self.flat.copy_(result)
            return
        offset = 0
        with torch.no_grad():
            for t in self.tensors:
                n = t.numel()
                t.copy_(result[offset : offset + n].view_as(t))
                offset += n


def flatten(tensors: Sequence[torch.Tensor]) -> FlatVector:
    """Shorthand for :class:`FlatVector`."""
    return FlatVector(tensors)


def _flat_view(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    first = tensors[0]
    if len(tensors) == 1 and first.is_contiguous():
        return first.detach().view(-1), True
    storage = first.untyped_storage()
    expected = first.storage_offset()
    for t in tensors:
        if (
            not t.is_contiguous()
            or t.untyped_storage().data_ptr() != storage.data_ptr()
            or t.storage_offset() != expected
        ):
            return torch.cat([t.detach().reshape(-1) for t in tensors]), False
        expected += t.numel()
    total = expected - first.storage_offset()
    flat = torch.empty(0, dtype=first.dtype).set_(storage, first.storage_offset(), (total,), (1,))
    return flat, True
