"""Fixed-length byte windows: random ones for training, fixed ones for validation.

``TrainWindows`` draws ``batch_size`` random windows of ``seq_len + 1`` bytes per batch from
its shard of the training bytes, with its own ``torch.Generator`` (never the global RNG).
Shards are contiguous, disjoint byte ranges of the corpus, so peers with different
``shard_index`` never see the same training window. ``state_dict``/``load_state_dict`` save
and restore the generator and the batch count, which makes resume bit-exact.

``val_batches`` returns the same evenly spaced, non-overlapping validation windows every time.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from shoal.errors import ConfigError, DataError

__all__ = ["TrainWindows", "shard_bounds", "val_batches"]

Batch = tuple[torch.Tensor, torch.Tensor]


def shard_bounds(length: int, shard_index: int, num_shards: int) -> tuple[int, int]:
    """Byte range ``[lo, hi)`` of shard ``shard_index`` out of ``num_shards``."""
    if num_shards < 1:
        raise ConfigError(f"data.num_shards must be >= 1, got {num_shards!r}")
    if not 0 <= shard_index < num_shards:
        raise ConfigError(f"data.shard_index must be in [0, {num_shards}), got {shard_index!r}")
    return length * shard_index // num_shards, length * (shard_index + 1) // num_shards


def _stream_seed(seed: int, shard_index: int) -> int:
    digest = hashlib.sha256(f"shoal-data:{seed}:{shard_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> Batch:
    idx = starts[:, None] + torch.arange(seq_len + 1)  # (B, T+1)
    chunk = data[idx].long()  # (B, T+1)
    return chunk[:, :-1], chunk[:, 1:]  # x (B, T), y (B, T)


class TrainWindows:
    """Random training windows from one shard; an endless, resumable batch stream."""

    def __init__(
        self,
        data: torch.Tensor,
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        shard_index: int = 0,
        num_shards: int = 1,
    ) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ConfigError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        self.lo, self.hi = shard_bounds(int(data.numel()), shard_index, num_shards)
        if self.hi - self.lo < seq_len + 1:
            raise DataError(
                f"training shard {shard_index}/{num_shards} holds {self.hi - self.lo} bytes, "
                f"fewer than seq_len + 1 = {seq_len + 1}"
            )
        self.data = data
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.shard_index = shard_index
        self.num_shards = num_shards
        self.generator = torch.Generator(device="cpu").manual_seed(_stream_seed(seed, shard_index))
        self.batches_drawn = 0

    def next_batch(self) -> Batch:
        """Next (x, y) pair of int64 tensors (B, T); y is x shifted by one byte."""
        last_start = self.hi - self.seq_len - 1  # inclusive
        starts = torch.randint(
            self.lo, last_start + 1, (self.batch_size,), generator=self.generator
        )  # (B,)
        self.batches_drawn += 1
        return _windows(self.data, starts, self.seq_len)

    def state_dict(self) -> dict[str, Any]:
        """Position in the stream: generator state (uint8 tensor) and batches drawn."""
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        gen = state["generator"]
        if not isinstance(gen, torch.Tensor) or gen.dtype != torch.uint8:
            raise DataError("data state: generator must be a uint8 tensor")
        self.generator.set_state(gen.clone())
        self.batches_drawn = int(state["batches_drawn"])


def val_batches(
    data: torch.Tensor, *, seq_len: int, batch_size: int, max_batches: int
) -> list[Batch]:
    """Up to ``max_batches`` batches of evenly spaced, non-overlapping validation windows.

    Raises:
        DataError: the validation bytes are shorter than one window.
    """
    n = int(data.numel())
    available = (n - 1) // seq_len
    if available < 1:
        raise DataError(f"validation data holds {n} bytes, fewer than seq_len + 1 = {seq_len + 1}")
    count = min(available, max_batches * batch_size)
    stride = available // count
    starts = torch.arange(count) * stride * seq_len  # (N,)
    return [_windows(data, s, seq_len) for s in starts.split(batch_size)]
