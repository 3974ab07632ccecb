"""What a round takes from the wire: parts decoded in the round's codec, results refused
unless finite, contributions refused for impossible weights and by ``aggregate.screen``.
Pure functions on tensors (``allreduce.py`` runs the big ones on a worker thread).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from shoal.compress import Codec, Encoded
from shoal.parallel.data.aggregate import AggregationConfig, screen
from shoal.parallel.data.messages import Contribution, Member, WireTensor, wire_numel

__all__ = ["MAX_WEIGHT", "collect", "decode", "decode_result", "screen_contributions"]

# A weight counts samples: beyond 2**53 a float no longer counts them exactly, and a few
# 1e308 weights would overflow the sum to inf (every alpha 0: an all-zero "mean").
MAX_WEIGHT = 2.0**53


def decode(codec: Codec | None, data: WireTensor) -> torch.Tensor:
    """A part as a flat tensor; ``ValueError`` unless it travelled in the round's codec."""
    if isinstance(data, Encoded):
        if codec is None:
            raise ValueError(f"received {data.codec!r}-encoded data, but no codec is set")
        if data.codec != codec.name:  # int8 bytes read as int4 nibbles decode to garbage
            raise ValueError(
                f"received {data.codec!r}-encoded data, this round uses {codec.name!r}"
            )
        return codec.decode(data).reshape(-1)
    if codec is not None:  # raw values would pass what the codec bounds (fp16's range)
        raise ValueError(f"received raw data, this round uses {codec.name!r}")
    return data.reshape(-1)


def decode_result(codec: Codec | None, data: WireTensor) -> torch.Tensor:
    """A reducer's result part, decoded; refused unless every value is finite."""
    part = decode(codec, data)
    # One cheap pass: a NaN or inf anywhere makes the sum non-finite. Finite values near
    # fp32's limit can overflow it too, so only then is every value looked at.
    if not math.isfinite(float(part.sum())) and not bool(torch.isfinite(part).all()):
        raise ValueError("values are not finite")
    return part


def collect(
    received: Sequence[Contribution], numel: int, codec: Codec | None
) -> dict[Member, tuple[float, torch.Tensor]]:
    """Sender -> (weight, decoded part) of the contributions that decode to ``numel``
    fp32 values (the first of each sender; the others are unreadable and left out)."""
    got: dict[Member, tuple[float, torch.Tensor]] = {}
    for c in received:
        if c.sender in got or wire_numel(c.data) != numel:  # sized before decoding
            continue
        try:
            tensor = decode(codec, c.data)
        except (ValueError, RuntimeError):
            continue
        if tensor.numel() == numel and tensor.dtype == torch.float32:
            got[c.sender] = (c.weight, tensor)
    return got


def screen_contributions(
    got: dict[Member, tuple[float, torch.Tensor]], config: AggregationConfig
) -> tuple[set[Member], dict[Member, str]]:
    """Accepted senders, and the refused ones with the reason: weights outside
    (0, 2**53], then ``aggregate.screen``."""
    bad_weight = {
        p: f"weight {w!r} is not in (0, 2**53]"
        for p, (w, _) in got.items()
        if not (0 < w <= MAX_WEIGHT)
    }
    accepted, rejected = screen({p: t for p, (w, t) in got.items() if p not in bad_weight}, config)
    rejected.update(bad_weight)
    return accepted, rejected
