"""The committed generated code matches proto/ (and a changed .proto is detected)."""

from __future__ import annotations

import shutil

from shoal.net import protogen


def test_committed_generated_code_is_fresh():
    assert protogen.stale_files() == [], "run `make proto` and commit src/shoal/net/proto"


def test_changed_proto_is_detected(tmp_path):
    root = tmp_path / "proto"
    shutil.copytree(protogen.PROTO_ROOT, root)
    peer = root / "shoal" / "v1" / "peer.proto"
    peer.write_text(peer.read_text() + "\nmessage Extra { uint32 x = 1; }\n")
    assert "peer_pb2.py" in protogen.stale_files(proto_root=root)
    (root / "shoal" / "v1" / "extra.proto").write_text(
        'syntax = "proto3";\npackage shoal.v1;\nmessage Other {}\n'
    )
    assert "extra_pb2.py" in protogen.stale_files(proto_root=root)


def test_generated_imports_are_rewritten():
    text = (protogen.OUT_DIR / "peer_pb2_grpc.py").read_text()
    assert "from shoal.net.proto.v1 import peer_pb2" in text
    assert "from shoal.v1 import" not in text
