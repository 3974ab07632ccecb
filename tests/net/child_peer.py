"""A peer in its own process for lifecycle tests (run as a script, killed by the test).

    python child_peer.py serve --seed S [--port P]       prints {"address", "peer_id"}
    python child_peer.py stream --target ADDR            streams to ADDR's Peer.Absorb
Both print one JSON line when ready and stop when stdin closes (or when killed).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading

import torch

from shoal.net.config import NetConfig
from shoal.net.identity import Identity
from shoal.net.proto.v1 import peer_pb2_grpc
from shoal.net.runtime import NetRuntime
from shoal.net.tensors import tensor_frames

MAX_STREAMS = 50  # bounded: a stream of 64 MiB, at most this many times, then exit


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["serve", "stream"])
    parser.add_argument("--seed", default="")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--target", default="")
    args = parser.parse_args()
    identity = Identity.from_seed(args.seed.encode()) if args.seed else Identity.generate()
    runtime = NetRuntime(identity, NetConfig(port=args.port)).start()
    print(
        json.dumps({"address": runtime.address, "peer_id": runtime.peer_id.to_string()}), flush=True
    )
    if args.mode == "stream":
        stub = runtime.stub(peer_pb2_grpc.PeerStub, args.target)
        tensor = torch.zeros(64 << 20, dtype=torch.uint8)

        def feed() -> None:
            for _ in range(MAX_STREAMS):
                runtime.run(
                    stub.Absorb(tensor_frames(tensor, chunk_bytes=64 << 10), timeout_s=60),
                    timeout_s=60,
                )

        threading.Thread(target=feed, daemon=True).start()
    sys.stdin.read()
    runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
