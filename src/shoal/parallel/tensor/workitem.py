"""The work item rank 0 broadcasts to its followers: a fixed-size header, then the tensors.

Header: ``HEADER_LEN`` int64 values::

    [version, kind, n_tensors, (dtype code, ndim, d0, d1, d2, d3) * MAX_TENSORS, pad]

Followers allocate the tensors the header describes and receive them by broadcast. Rank 0
runs the same code as its followers, but the header is still checked before anything is
allocated (known kind and dtype, at most 4 dims, at most ``max_elements`` per tensor), so a
bug shows as a clear error instead of a huge allocation or a hang. Pure functions, no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shoal.errors import ProtocolViolation

__all__ = ["HEADER_LEN", "Kind", "TensorSpec", "decode_header", "encode_header"]

VERSION = 1
MAX_TENSORS = 2
MAX_DIMS = 4
HEADER_LEN = 3 + MAX_TENSORS * (2 + MAX_DIMS)

DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.float16,
    torch.int64,
    torch.int32,
)


class Kind(enum.IntEnum):
    """What every rank does with a work item."""

    FORWARD = 1
    """Forward without autograd: inputs [, targets] -> outputs (or loss on the last stage)."""
    BACKWARD = 2
    """Recompute forward and back-propagate: inputs, grad_outputs or targets -> grad_inputs."""
    STEP = 3
    """Optimizer step on the accumulated gradients, then zero them; payload: lr (float64)."""
    ZERO_GRAD = 4
    """Drop the accumulated gradients."""
    STOP = 5
    """Followers leave their loop."""
    # Kinds of the pipeline stage core (pipeline_core.py):
    INSTALL = 6
    """Build and shard a stage; payload: stage index (int64)."""
    KEEP_FORWARD = 7
    """Forward with autograd, keeping the graph for the next GRADS: inputs [, targets]."""
    GRADS = 8
    """Differentiate the kept graph into pending gradients: [grad of outputs] (or none)."""
    APPLY = 9
    """Add the pending gradients into the accumulator."""
    DISCARD = 10
    """Drop the pending gradients."""
    STEP_MEAN = 11
    """Scale the accumulated gradients by a factor (float64), step, zero them."""
    GATHER = 12
    """All-gather the stage's parameters in dense layout (rank 0 returns them)."""
    ADD_DELTA = 13
    """Add a flat dense-layout delta (float) to the parameters, each rank its shard."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]


def encode_header(kind: Kind, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The int64 header (CPU) describing ``kind`` and ``tensors``."""
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"a work item carries at most {MAX_TENSORS} tensors, got {len(tensors)}")
    values = [VERSION, int(kind), len(tensors)]
    for t in tensors:
        if t.dtype not in DTYPES or t.dim() > MAX_DIMS:
            raise ValueError(f"unsupported tensor {t.dtype} with {t.dim()} dims")
        shape = list(t.shape) + [0] * (MAX_DIMS - t.dim())
        values += [DTYPES.index(t.dtype), t.dim(), *shape]
    values += [0] * (HEADER_LEN - len(values))
    return torch.tensor(values, dtype=torch.int64)


def decode_header(header: torch.Tensor, *, max_elements: int) -> tuple[Kind, list[TensorSpec]]:
    """Kind and tensor specs from a received header.

    Raises:
        ProtocolViolation: wrong length or version, unknown kind or dtype, too many dims or
            elements.
    """
    if header.dtype != torch.int64 or header.numel() != HEADER_LEN:
        raise ProtocolViolation(f"work item header must be {HEADER_LEN} int64 values")
    v = [int(x) for x in header.tolist()]
    if v[0] != VERSION:
        raise ProtocolViolation(f"work item version {v[0]}, expected {VERSION}")
    try:
        kind = Kind(v[1])
    except ValueError:
        raise ProtocolViolation(f"unknown work item kind {v[1]}") from None
    count = v[2]
    if not 0 <= count <= MAX_TENSORS:
        raise ProtocolViolation(f"work item carries {count} tensors, at most {MAX_TENSORS}")
    specs = []
    for i in range(count):
        code, ndim, *dims = v[3 + i * (2 + MAX_DIMS) : 3 + (i + 1) * (2 + MAX_DIMS)]
        if not 0 <= code < len(DTYPES) or not 0 <= ndim <= MAX_DIMS:
            raise ProtocolViolation(f"tensor {i}: bad dtype code {code} or ndim {ndim}")
        shape = tuple(dims[:ndim])
        numel = 1
        for d in shape:
            if d < 0:
                raise ProtocolViolation(f"tensor {i}: negative dimension in {shape}")
            numel *= d
        if numel > max_elements:
            raise ProtocolViolation(f"tensor {i}: {numel} elements > limit {max_elements}")
        specs.append(TensorSpec(DTYPES[code], shape))
    return kind, specs
