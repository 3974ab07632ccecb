"""The ``Stage`` gRPC service: framing and bounds only; decisions live in ``StageServer``.

Each handler reads the meta frame, answers BUSY before reading any tensor when the queue is
full, checks the declared tensor count against the codec, reads the tensors (bounded by the
runtime's ``TensorLimits``), and streams back a ``StageReply`` meta frame plus its tensors.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from shoal.errors import ProtocolViolation
from shoal.net.proto.v1 import stage_pb2 as pb
from shoal.net.proto.v1 import stage_pb2_grpc as rpc
from shoal.net.tensors import TensorReader, as_tensor, meta_frame, tensor_frames
from shoal.parallel.pipeline.codecs import payload_count
from shoal.parallel.pipeline.config import CODECS

if TYPE_CHECKING:
    from shoal.parallel.pipeline.server import StageServer

__all__ = ["StageService", "reply_frames"]

MAX_REQUEST_ID_BYTES = 32


def reply_frames(reply: pb.StageReply, tensors: Sequence[torch.Tensor]) -> Iterator[Any]:
    return itertools.chain([meta_frame(reply)], *(tensor_frames(t) for t in tensors))


def _check(request_id: bytes, codec: str, count: int) -> None:
    if not 0 < len(request_id) <= MAX_REQUEST_ID_BYTES:
        raise ProtocolViolation(f"request id of {len(request_id)} bytes")
    if codec not in CODECS:
        raise ProtocolViolation(f"unknown codec {codec[:32]!r}")
    if count not in (1, payload_count(codec)):
        raise ProtocolViolation(f"{count} payload tensors for codec {codec}")


class StageService(rpc.StageServicer):
    """Handlers of ``shoal.v1.Stage`` for one ``StageServer``."""

    def __init__(self, server: StageServer) -> None:
        self.server = server
        self.limits = server.runtime.config.tensor_limits

    async def Forward(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        reader = TensorReader(request_iterator, self.limits)
        req = await reader.read_meta(pb.ForwardRequest)
        _check(req.request_id, req.codec, req.payload_tensors)
        admitted = self.server.admit(backward=False)
        if admitted is not None:
            for frame in reply_frames(admitted, ()):
                yield frame
            return
        try:
            payload = [await reader.read_tensor() for _ in range(req.payload_tensors)]
            targets = await reader.read_tensor() if req.has_targets else None
            reply, tensors = await self.server.forward(req, payload, targets)
        finally:
            self.server.release(backward=False)
        for frame in reply_frames(reply, tensors):
            yield frame

    async def Backward(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        reader = TensorReader(request_iterator, self.limits)
        req = await reader.read_meta(pb.BackwardRequest)
        _check(req.request_id, req.codec, req.payload_tensors)
        admitted = self.server.admit(backward=True)
        if admitted is not None:
            for frame in reply_frames(admitted, ()):
                yield frame
            return
        try:
            payload = [await reader.read_tensor() for _ in range(req.payload_tensors)]
            reply, tensors = await self.server.backward(req, payload)
        finally:
            self.server.release(backward=True)
        for frame in reply_frames(reply, tensors):
            yield frame

    async def Parameters(self, request: pb.ParametersRequest, context: Any) -> AsyncIterator[Any]:
        stage, steps, state = await self.server.parameters(request.stage)
        yield meta_frame(pb.ParametersInfo(stage=stage, tensors=len(state), optimizer_steps=steps))
        for name, tensor in state.items():
            for frame in tensor_frames(tensor, name=name):
                yield frame

    async def Info(self, request: pb.StageInfoRequest, context: Any) -> pb.StageInfo:
        return self.server.core.info()


async def read_parameters(
    frames: AsyncIterator[Any], limits: Any, max_tensors: int
) -> tuple[pb.ParametersInfo, dict[str, torch.Tensor]]:
    """The client side of ``Parameters``: info and named tensors (count bounded)."""
    reader = TensorReader(frames, limits)
    info = await reader.read_meta(pb.ParametersInfo)
    if info.tensors > max_tensors:
        raise ProtocolViolation(f"{info.tensors} parameter tensors, at most {max_tensors}")
    state: dict[str, torch.Tensor] = {}
    for _ in range(info.tensors):
        header, buf = await reader.read_payload()
        if header.codec != "raw" or not header.name or header.name in state:
            raise ProtocolViolation("parameter tensors must be raw, named and unique")
        state[header.name] = as_tensor(header, buf)
    return info, state
