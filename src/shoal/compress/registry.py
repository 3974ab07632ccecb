"""Codec lookup by wire name, used by receivers to decode an ``Encoded`` header."""

from __future__ import annotations

import torch

from shoal.compress.codec import Codec, Encoded
from shoal.compress.fp16 import Fp16Codec
from shoal.compress.int4 import Int4BlockwiseCodec
from shoal.compress.int8 import Int8BlockwiseCodec
from shoal.compress.powersgd import PowerSGDCodec
from shoal.compress.sparse import SparseCodec
from shoal.compress.topk import TopKCodec
from shoal.errors import ConfigError

__all__ = ["STATELESS_CODECS", "codec_by_name", "decode"]

STATELESS_CODECS = ("none", "fp16", "int8", "int4", "sparse")


def codec_by_name(
    name: str, *, int8_block_size: int = 4096, int4_block_size: int = 256
) -> Codec | None:
    """A stateless wire codec by name; ``"none"`` gives ``None`` (raw fp32)."""
    if name == "none":
        return None
    if name == "fp16":
        return Fp16Codec()
    if name == "int8":
        return Int8BlockwiseCodec(int8_block_size)
    if name == "int4":
        return Int4BlockwiseCodec(int4_block_size)
    if name == "sparse":
        return SparseCodec()
    raise ConfigError(f"unknown wire codec {name!r}; choose one of {STATELESS_CODECS}")


def decode(encoded: Encoded) -> torch.Tensor:
    """Decode any ``Encoded`` value by its codec name (decoding never needs state)."""
    codecs: dict[str, Codec] = {
        "fp16": Fp16Codec(),
        "int8": Int8BlockwiseCodec(int(encoded.meta.get("block_size", 4096))),
        "int4": Int4BlockwiseCodec(int(encoded.meta.get("block_size", 256))),
        "sparse": SparseCodec(),
        "topk": TopKCodec(k=1),
        "powersgd": PowerSGDCodec(1),
    }
    codec = codecs.get(encoded.codec)
    if codec is None:
        raise ValueError(f"unknown codec {encoded.codec!r}")
    return codec.decode(encoded)
