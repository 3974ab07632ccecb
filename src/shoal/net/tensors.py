"""Tensor streams: a ``TensorHeader`` frame, then raw payload chunks of at most 1 MiB.

Sending: ``tensor_frames(tensor)`` yields the header and then ``Chunk`` objects that are
memoryview slices of the tensor's own storage (no copy until gRPC takes the bytes).
``meta_frame(msg)`` wraps a service's own message to travel in the same stream.

Receiving: ``TensorReader(frames, limits)`` checks each header against ``TensorLimits``
before allocating, fills one preallocated buffer chunk by chunk, verifies the xxHash3
checksum incrementally, and returns ``torch.frombuffer`` over that buffer (no further copy).

Fast path: when a method's message type is ``shoal.v1.TensorFrame`` itself, the server and
client swap protobuf's (de)serializer for ``encode_frame``/``decode_frame``, which emit and
parse chunk frames without copying the payload through protobuf. The bytes on the wire are
plain protobuf either way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import xxhash
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from shoal.errors import ProtocolViolation
from shoal.net.config import MiB, TensorLimits
from shoal.net.proto.v1 import tensor_pb2

DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "float32": (tensor_pb2.FLOAT32, torch.float32),
    "float16": (tensor_pb2.FLOAT16, torch.float16),
    "bfloat16": (tensor_pb2.BFLOAT16, torch.bfloat16),
    "float64": (tensor_pb2.FLOAT64, torch.float64),
    "int8": (tensor_pb2.INT8, torch.int8),
    "uint8": (tensor_pb2.UINT8, torch.uint8),
    "int16": (tensor_pb2.INT16, torch.int16),
    "int32": (tensor_pb2.INT32, torch.int32),
    "int64": (tensor_pb2.INT64, torch.int64),
    "bool": (tensor_pb2.BOOL, torch.bool),
}
_BY_ENUM = {enum: (name, dt) for name, (enum, dt) in DTYPES.items()}
_BY_TORCH = {dt: name for name, (_, dt) in DTYPES.items()}
RAW = "raw"
_CHUNK_TAG = 0x12  # field 2 (chunk), wire type 2 (length-delimited)
M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One payload chunk as a buffer view (what the fast path yields instead of a message)."""

    data: memoryview


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_frame(frame: tensor_pb2.TensorFrame | Chunk | bytes) -> bytes:
    """Serialize a frame; a ``Chunk`` is written as ``TensorFrame{chunk}`` with one copy.

    ``bytes`` are a frame serialized earlier (``encode_frame`` output kept to send the same
    frame on several streams) and pass through unchanged.
    """
    if isinstance(frame, bytes):
        return frame
    if isinstance(frame, Chunk):
        return b"".join((b"\x12", _varint(frame.data.nbytes), frame.data))
    data: bytes = frame.SerializeToString()
    return data


def decode_frame(data: bytes) -> tensor_pb2.TensorFrame | Chunk:
    """Parse a frame; a plain chunk frame becomes a zero-copy ``Chunk`` over ``data``."""
    if len(data) > 1 and data[0] == _CHUNK_TAG:
        length, pos, shift = 0, 1, 0
        while pos < len(data) and pos < 11:
            byte = data[pos]
            length |= (byte & 0x7F) << shift
            pos += 1
            shift += 7
            if not byte & 0x80:
                if pos + length == len(data):
                    return Chunk(memoryview(data)[pos:])
                break
    try:
        frame: tensor_pb2.TensorFrame = tensor_pb2.TensorFrame.FromString(data)
        return frame
    except DecodeError as exc:
        raise ProtocolViolation(f"malformed tensor frame: {exc}") from exc


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A flat byte view of a CPU tensor's storage (copies only when not contiguous)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    array: Any = flat.view(torch.uint8).numpy()
    return memoryview(array).cast("B")


def make_header(
    tensor: torch.Tensor, payload: memoryview, *, codec: str = RAW, name: str = ""
) -> tensor_pb2.TensorHeader:
    """The header for ``payload`` (the tensor's bytes, or a codec's output for it)."""
    if tensor.dtype not in _BY_TORCH:
        raise ProtocolViolation(f"dtype {tensor.dtype} cannot be sent")
    return tensor_pb2.TensorHeader(
        dtype=DTYPES[_BY_TORCH[tensor.dtype]][0],  # type: ignore[arg-type]
        shape=list(tensor.shape),
        codec=codec,
        byte_length=payload.nbytes,
        checksum_kind=tensor_pb2.XXH3_64,
        checksum=xxhash.xxh3_64_intdigest(payload),
        name=name,
    )


def payload_frames(
    header: tensor_pb2.TensorHeader, payload: memoryview, chunk_bytes: int = MiB
) -> Iterator[tensor_pb2.TensorFrame | Chunk]:
    """Header frame, then ``payload`` in chunks of at most ``chunk_bytes`` (views, no copy)."""
    if not 0 < chunk_bytes <= MiB:
        raise ValueError(f"chunk_bytes must be in (0, 1 MiB], got {chunk_bytes}")
    yield tensor_pb2.TensorFrame(header=header)
    for start in range(0, payload.nbytes, chunk_bytes):
        yield Chunk(payload[start : start + chunk_bytes])


def tensor_frames(
    tensor: torch.Tensor, *, name: str = "", chunk_bytes: int = MiB
) -> Iterator[tensor_pb2.TensorFrame | Chunk]:
    """Frames that carry ``tensor`` raw (header, then chunks)."""
    payload = tensor_bytes(tensor)
    return payload_frames(make_header(tensor, payload, name=name), payload, chunk_bytes)


def meta_frame(message: Message) -> tensor_pb2.TensorFrame:
    """A frame carrying a service's own message (read back with ``TensorReader.read_meta``)."""
    packed = any_pb2.Any()
    packed.Pack(message)
    return tensor_pb2.TensorFrame(meta=packed)


def check_header(header: tensor_pb2.TensorHeader, limits: TensorLimits) -> tuple[str, int]:
    """Validate a header before allocating; returns (dtype name, element count)."""
    entry = _BY_ENUM.get(header.dtype)
    if entry is None or entry[0] not in limits.allowed_dtypes:
        raise ProtocolViolation(f"tensor dtype {header.dtype} not allowed")
    if len(header.shape) > limits.max_dims:
        raise ProtocolViolation(f"tensor has {len(header.shape)} dims, limit {limits.max_dims}")
    if header.byte_length > limits.max_bytes:
        raise ProtocolViolation(
            f"tensor payload of {header.byte_length} bytes exceeds limit {limits.max_bytes}"
        )
    if header.checksum_kind != tensor_pb2.XXH3_64:
        raise ProtocolViolation(f"unsupported checksum kind {header.checksum_kind}")
    numel = 1
    for dim in header.shape:
        numel *= dim
        # Every dimension on its own too: [0, 2**64 - 1] has no elements but no tensor either.
        if numel > limits.max_bytes or dim > limits.max_bytes:
            raise ProtocolViolation(f"tensor shape {list(header.shape)} too large")
    if header.codec == RAW:
        itemsize = torch.empty((), dtype=entry[1]).element_size()
        if numel * itemsize != header.byte_length:
            raise ProtocolViolation(
                f"raw tensor {list(header.shape)} {entry[0]} needs {numel * itemsize} bytes, "
                f"header says {header.byte_length}"
            )
    return entry[0], numel


class TensorReader:
    """Reads metas and tensors from a stream of frames, checking every bound."""

    def __init__(self, frames: AsyncIterator[Any], limits: TensorLimits) -> None:
        self._frames = frames.__aiter__()
        self._limits = limits
        self._tensors = 0
        self.bytes_received = 0

    async def _next(self) -> Any:
        try:
            return await self._frames.__anext__()
        except StopAsyncIteration:
            raise ProtocolViolation("tensor stream ended early") from None

    async def read_meta(self, cls: type[M]) -> M:
        """The next frame as a ``meta`` of type ``cls``."""
        frame = await self._next()
        if isinstance(frame, Chunk) or frame.WhichOneof("frame") != "meta":
            raise ProtocolViolation("expected a meta frame")
        msg: M = cls()
        try:
            unpacked = frame.meta.Unpack(msg)
        except DecodeError as exc:  # the frame parsed; what its Any holds did not
            raise ProtocolViolation(f"malformed {cls.DESCRIPTOR.full_name}: {exc}") from None
        if not unpacked:
            raise ProtocolViolation(
                f"meta frame is {frame.meta.type_url}, wanted {cls.DESCRIPTOR.full_name}"
            )
        return msg

    async def read_payload(self) -> tuple[tensor_pb2.TensorHeader, bytearray]:
        """The next header and its verified payload bytes."""
        frame = await self._next()
        if isinstance(frame, Chunk) or frame.WhichOneof("frame") != "header":
            raise ProtocolViolation("expected a tensor header frame")
        return await self.read_body(frame.header)

    async def read_body(
        self,
        header: tensor_pb2.TensorHeader,
        alloc: Callable[[int], bytearray] = bytearray,
    ) -> tuple[tensor_pb2.TensorHeader, bytearray]:
        """Payload chunks for ``header`` (already read), checked and verified.

        ``alloc(nbytes)`` supplies the destination once the header passed its checks (e.g. a
        pool of reused buffers; its contents are overwritten).
        """
        self._tensors += 1
        if self._tensors > self._limits.max_tensors:
            raise ProtocolViolation(f"more than {self._limits.max_tensors} tensors in a stream")
        check_header(header, self._limits)
        total = header.byte_length
        buf = alloc(total)
        view = memoryview(buf)
        hasher = xxhash.xxh3_64()
        pos = 0
        while pos < total:
            frame = await self._next()
            if isinstance(frame, Chunk):
                data = frame.data
            elif frame.WhichOneof("frame") == "chunk":
                data = memoryview(frame.chunk)
            else:
                raise ProtocolViolation(f"expected a chunk at byte {pos} of {total}")
            n = data.nbytes
            if n == 0 or n > MiB or pos + n > total:
                raise ProtocolViolation(f"chunk of {n} bytes at {pos} overruns {total}")
            view[pos : pos + n] = data
            hasher.update(data)
            pos += n
        view.release()
        if hasher.intdigest() != header.checksum:
            raise ProtocolViolation(f"tensor checksum mismatch ({total} bytes)")
        self.bytes_received += total
        return header, buf

    async def read_tensor(self) -> torch.Tensor:
        """The next raw tensor (a view over its receive buffer)."""
        header, buf = await self.read_payload()
        if header.codec != RAW:
            raise ProtocolViolation(f"expected a raw tensor, got codec {header.codec!r}")
        return as_tensor(header, buf)


def as_tensor(header: tensor_pb2.TensorHeader, buf: bytearray) -> torch.Tensor:
    """View ``buf`` (a raw payload) as the tensor its header describes."""
    dtype = _BY_ENUM[header.dtype][1]
    shape = tuple(header.shape)
    if not buf:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


__all__ = [
    "DTYPES",
    "RAW",
    "Chunk",
    "TensorReader",
    "as_tensor",
    "check_header",
    "decode_frame",
    "encode_frame",
    "make_header",
    "meta_frame",
    "payload_frames",
    "tensor_bytes",
    "tensor_frames",
]
