"""A bidirectional stream through the full stack, with a service compiled at test time."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from shoal.net import protogen
from shoal.net.server import current_caller
from shoal.net.tensors import TensorReader, tensor_frames

PROTOS = Path(__file__).with_name("protos")


@pytest.fixture(scope="module")
def echo_modules(tmp_path_factory):
    import grpc_tools
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("echo")
    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{protogen.PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "shoal/test/echo.proto",
        ]
    )
    assert status == 0
    folder = out / "shoal" / "test"
    for path in folder.glob("*.py"):
        text = path.read_text().replace("from shoal.test import", "import")
        path.write_text(protogen._rewrite_imports(text))
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("echo_pb2_grpc")
    finally:
        sys.path.remove(str(folder))


def test_bidi_tensor_stream(make_runtime, echo_modules):
    rpc = echo_modules
    seen = []

    class Echo(rpc.EchoServicer):
        async def Chat(self, request_iterator, context):
            seen.append(current_caller())
            reader = TensorReader(request_iterator, b.config.tensor_limits)
            for _ in range(3):
                tensor = await reader.read_tensor()
                for frame in tensor_frames(tensor * 2, chunk_bytes=4096):
                    yield frame

    a, b = make_runtime(), make_runtime()
    b.add_servicer(rpc.add_EchoServicer_to_server, Echo())
    stub = a.stub(rpc.EchoStub, b.address)
    sent = [torch.randn(100, 30), torch.arange(7.0), torch.ones(2, 2, 2)]

    def frames():
        for t in sent:
            yield from tensor_frames(t, chunk_bytes=1000)

    async def chat():
        reader = TensorReader(stub.Chat(frames(), timeout_s=10), a.config.tensor_limits)
        return [await reader.read_tensor() for _ in sent]

    got = a.run(chat(), 15)
    assert all(torch.equal(g, s * 2) for g, s in zip(got, sent, strict=True))
    assert seen == [a.peer_id]
