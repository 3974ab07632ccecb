"""Shoal's transport layer: identity, gRPC runtime, authenticated calls, tensor streams.

The public API, imported lazily so that ``import shoal.net.identity`` stays light:

    NetRuntime, NetConfig, RetryPolicy, TensorLimits, HealthConfig, Identity, PeerID,
    Stub, current_caller, tensor_frames, payload_frames, meta_frame, TensorReader, Chunk

See ``src/shoal/net/README.md`` for examples.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "NetRuntime": "shoal.net.runtime",
    "NetConfig": "shoal.net.config",
    "RetryPolicy": "shoal.net.config",
    "TensorLimits": "shoal.net.config",
    "HealthConfig": "shoal.net.config",
    "Identity": "shoal.net.identity",
    "PeerID": "shoal.net.identity",
    "Stub": "shoal.net.client",
    "current_caller": "shoal.net.server",
    "tensor_frames": "shoal.net.tensors",
    "payload_frames": "shoal.net.tensors",
    "meta_frame": "shoal.net.tensors",
    "TensorReader": "shoal.net.tensors",
    "Chunk": "shoal.net.tensors",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shoal.net' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_EXPORTS)
