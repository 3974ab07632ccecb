"""Tensor stream framing, limits and checksums; parsers fuzzed with hypothesis."""

from __future__ import annotations

import asyncio
import tracemalloc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.errors import ProtocolViolation
from shoal.net.config import MiB, TensorLimits
from shoal.net.proto.v1 import peer_pb2, tensor_pb2
from shoal.net.tensors import (
    Chunk,
    TensorReader,
    check_header,
    decode_frame,
    encode_frame,
    meta_frame,
    tensor_frames,
)

LIMITS = TensorLimits(max_bytes=64 * MiB)


async def _aiter(items):
    for item in items:
        yield item


def _read_all(frames, limits=LIMITS, count=1):
    async def go():
        reader = TensorReader(_aiter(frames), limits)
        return [await reader.read_tensor() for _ in range(count)]

    return asyncio.run(go())


def _wire(frames):
    """Frames as they arrive from the network (encoded, then decoded)."""
    return [decode_frame(encode_frame(f)) for f in frames]


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(17, 33),
        torch.arange(-5, 5, dtype=torch.int8),
        torch.tensor(3.5),
        torch.ones(2, 3, 4, dtype=torch.bfloat16),
        torch.tensor([True, False]),
        torch.randn(8, 8).t(),
        torch.zeros(0, 4, dtype=torch.float16),
    ],
)
def test_round_trip(tensor):
    (got,) = _read_all(_wire(tensor_frames(tensor, chunk_bytes=100)))
    assert got.dtype == tensor.dtype and got.shape == tensor.shape
    assert torch.equal(got, tensor)


def test_chunks_are_views_and_wire_compatible():
    tensor = torch.arange(3 * MiB // 4, dtype=torch.float32)
    frames = list(tensor_frames(tensor))
    assert len(frames) == 4 and all(isinstance(f, Chunk) for f in frames[1:])
    assert all(f.data.nbytes <= MiB for f in frames[1:])
    for frame in frames[1:]:
        data = encode_frame(frame)
        assert tensor_pb2.TensorFrame.FromString(data).chunk == bytes(frame.data)
        assert isinstance(decode_frame(data), Chunk)
    # a chunk sent by a plain protobuf sender is read the same way
    slow = [frames[0], *(tensor_pb2.TensorFrame(chunk=bytes(f.data)) for f in frames[1:])]
    assert torch.equal(_read_all(slow)[0], tensor)


def test_meta_frames_travel_with_tensors():
    frames = [meta_frame(peer_pb2.EmitRequest(byte_length=7)), *tensor_frames(torch.ones(3))]

    async def go():
        reader = TensorReader(_aiter(_wire(frames)), LIMITS)
        meta = await reader.read_meta(peer_pb2.EmitRequest)
        return meta, await reader.read_tensor()

    meta, tensor = asyncio.run(go())
    assert meta.byte_length == 7 and tensor.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ProtocolViolation, match="wanted"):
        asyncio.run(TensorReader(_aiter(frames), LIMITS).read_meta(peer_pb2.PingRequest))
    corrupt = meta_frame(peer_pb2.EmitRequest(byte_length=7))
    corrupt.meta.value = b"\xff\xff\xff"  # the frame parses; the message inside does not
    with pytest.raises(ProtocolViolation, match=r"malformed shoal\.v1\.EmitRequest"):
        asyncio.run(TensorReader(_aiter([corrupt]), LIMITS).read_meta(peer_pb2.EmitRequest))


def test_oversized_header_rejected_without_allocating():
    header = tensor_pb2.TensorHeader(
        dtype=tensor_pb2.UINT8,
        shape=[1 << 40],
        codec="raw",
        byte_length=1 << 40,
        checksum_kind=tensor_pb2.XXH3_64,
    )
    frames = [tensor_pb2.TensorFrame(header=header), Chunk(memoryview(b"x"))]
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolViolation, match="exceeds limit"):
            _read_all(frames)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MiB


@pytest.mark.parametrize(
    "change, match",
    [
        ({"dtype": 0}, "dtype"),
        ({"shape": [2] * 9}, "dims"),
        ({"byte_length": 5}, "needs"),
        ({"checksum_kind": 0}, "checksum kind"),
        ({"shape": [1 << 32, 1 << 32]}, "too large"),
        ({"shape": [0, (1 << 64) - 1], "byte_length": 0}, "too large"),  # no elements, no tensor
    ],
)
def test_header_checks(change, match):
    fields = {
        "dtype": tensor_pb2.FLOAT32,
        "shape": [2, 2],
        "codec": "raw",
        "byte_length": 16,
        "checksum_kind": tensor_pb2.XXH3_64,
    }
    fields.update(change)
    with pytest.raises(ProtocolViolation, match=match):
        check_header(tensor_pb2.TensorHeader(**fields), LIMITS)
    with pytest.raises(ProtocolViolation, match="not allowed"):
        check_header(
            tensor_pb2.TensorHeader(
                **{**fields, **{"shape": [4], "byte_length": 4, "dtype": tensor_pb2.UINT8}}
            ),
            TensorLimits(allowed_dtypes=frozenset({"float32"})),
        )


def test_corruption_overrun_and_truncation_detected():
    frames = list(tensor_frames(torch.arange(1000, dtype=torch.int32), chunk_bytes=1000))
    bad = bytearray(frames[2].data)
    bad[0] ^= 1
    with pytest.raises(ProtocolViolation, match="checksum"):
        _read_all([*frames[:2], Chunk(memoryview(bytes(bad))), *frames[3:]])
    with pytest.raises(ProtocolViolation, match="overruns"):
        _read_all([*frames[:2], Chunk(memoryview(b"z" * 4001))])
    with pytest.raises(ProtocolViolation, match="ended early"):
        _read_all(frames[:-1])
    with pytest.raises(ProtocolViolation, match="expected a chunk"):
        _read_all([frames[0], frames[0]])


frame_bytes = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=40).map(lambda b: b"\x12" + b),
    st.binary(max_size=40).map(lambda b: b"\x0a" + b),
)


@settings(max_examples=300, deadline=None)
@given(frame_bytes)
def test_decode_frame_fuzz(data):
    try:
        frame = decode_frame(data)
    except ProtocolViolation:
        return
    if isinstance(frame, Chunk):
        assert tensor_pb2.TensorFrame.FromString(data).chunk == bytes(frame.data)


headers = st.builds(
    tensor_pb2.TensorHeader,
    dtype=st.integers(0, 12),
    shape=st.lists(st.integers(0, 1 << 34), max_size=10),
    codec=st.sampled_from(["raw", "int8", ""]),
    byte_length=st.integers(0, 1 << 40),
    checksum_kind=st.integers(0, 2),
    checksum=st.integers(0, (1 << 64) - 1),
)


@settings(max_examples=300, deadline=None)
@given(headers, st.lists(st.binary(min_size=0, max_size=300), max_size=6))
def test_reader_fuzz_never_overallocates(header, chunks):
    small = TensorLimits(max_bytes=4096)
    frames = [tensor_pb2.TensorFrame(header=header), *(Chunk(memoryview(c)) for c in chunks)]
    tracemalloc.start()
    try:
        _read_all(frames, small)
    except ProtocolViolation:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 256 * 1024
