"""Codecs for gradients, pseudo-gradients and activations (see README.md).

Pure functions and small state objects on torch tensors; no I/O, no network.
"""

from shoal.compress.codec import Codec, Encoded, compression_ratio, fp32_bytes
from shoal.compress.fp16 import Fp16Codec
from shoal.compress.int4 import Int4BlockwiseCodec
from shoal.compress.int8 import Int8BlockwiseCodec
from shoal.compress.powersgd import PowerSGDCodec, PowerSGDState
from shoal.compress.registry import codec_by_name
from shoal.compress.sparse import SparseCodec
from shoal.compress.topk import ErrorFeedback, TopKCodec

__all__ = [
    "Codec",
    "Encoded",
    "ErrorFeedback",
    "Fp16Codec",
    "Int4BlockwiseCodec",
    "Int8BlockwiseCodec",
    "PowerSGDCodec",
    "PowerSGDState",
    "SparseCodec",
    "TopKCodec",
    "codec_by_name",
    "compression_ratio",
    "fp32_bytes",
]
