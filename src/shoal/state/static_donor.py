"""A donor process that serves one fixed, deterministic snapshot (for tests and benchmarks).

    python -m shoal.state.static_donor --params 1000000 --seed 0 [--join HOST:PORT]
                                      [--swarm NAME] [--raw]

``synthetic_snapshot(params, seed)`` builds the same model + AdamW-shaped state (parameters,
``exp_avg``, ``exp_avg_sq``: 3 x ``params`` float32) in every process, so several donors hold
the same version and a test can rebuild the expected tensors. The donor serves it with the
State service, announces it under ``state_key(swarm)`` when ``--join`` gives a DHT to join,
and with ``--raw`` also serves the same bytes on a bare grpc.aio stream (the benchmark's
baseline). It prints one JSON line ``{"event": "ready", ...}`` on stdout, then serves until
killed or until stdin closes.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc
import torch

from shoal.net.config import MiB
from shoal.state.checkpoint import Snapshot

__all__ = ["RAW_METHOD", "main", "synthetic_snapshot"]

RAW_METHOD = "/bench.RawState/Stream"
_TENSOR_ELEMENTS = 4 << 20


def synthetic_snapshot(params: int, seed: int, *, step: int = 1000) -> Snapshot:
    """``params`` float32 parameters in tensors of at most 4 Mi elements, plus AdamW moments."""
    gen = torch.Generator().manual_seed(seed)
    model: dict[str, torch.Tensor] = {}
    optim: dict[str, torch.Tensor] = {}
    left, index = params, 0
    while left > 0:
        n = min(left, _TENSOR_ELEMENTS)
        model[f"layer{index}.weight"] = torch.empty(n).uniform_(-1, 1, generator=gen)
        optim[f"state.{index}.exp_avg"] = torch.empty(n).uniform_(-1e-2, 1e-2, generator=gen)
        optim[f"state.{index}.exp_avg_sq"] = torch.empty(n).uniform_(0, 1e-4, generator=gen)
        optim[f"state.{index}.step"] = torch.tensor(float(step))
        left, index = left - n, index + 1
    return Snapshot(
        step=step,
        files={"model": model, "optimizer": optim, "extra": {"seed": torch.tensor([seed])}},
        meta={"synthetic": {"params": params, "seed": seed}},
    )


def _raw_handler(views: list[memoryview]) -> grpc.GenericRpcHandler:
    class Raw(grpc.GenericRpcHandler):  # type: ignore[misc]
        def service(self, details: grpc.HandlerCallDetails) -> Any:
            if details.method != RAW_METHOD:  # type: ignore[attr-defined]
                return None
            return grpc.unary_stream_rpc_method_handler(
                self.stream, request_deserializer=bytes, response_serializer=bytes
            )

        async def stream(self, request: bytes, context: Any) -> Any:
            for view in views:
                for pos in range(0, view.nbytes, MiB):
                    yield view[pos : pos + MiB]

    return Raw()


async def _serve_raw(views: list[memoryview]) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 4 * MiB)])
    server.add_generic_rpc_handlers((_raw_handler(views),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def main(argv: list[str] | None = None) -> int:
    from shoal.dht.peer import DHT
    from shoal.net import Identity, NetConfig, NetRuntime
    from shoal.state.announce import StateAnnouncer, state_key
    from shoal.state.snapshot import prepare
    from shoal.state.sync_service import StateServer

    parser = argparse.ArgumentParser(prog="python -m shoal.state.static_donor")
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--join", action="append", default=[])
    parser.add_argument("--swarm", default="demo")
    parser.add_argument("--raw", action="store_true")
    args = parser.parse_args(argv)

    served = prepare(synthetic_snapshot(args.params, args.seed))
    runtime = NetRuntime(Identity.generate(), NetConfig(port=0)).start()
    server = StateServer(runtime, lambda: served)
    info: dict[str, Any] = {
        "event": "ready",
        "address": runtime.address,
        "peer_id": runtime.peer_id.to_string(),
        "version": served.version,
        "step": served.step,
        "total_bytes": served.total_bytes,
    }
    raw_server = None
    if args.raw:
        raw_server, info["raw_port"] = runtime.run(_serve_raw(list(served.views)), timeout_s=10)
    dht = announcer = None
    if args.join:
        dht = DHT(runtime)
        dht.bootstrap(args.join)
        announcer = StateAnnouncer(
            dht, state_key(args.swarm), lambda: served, address=runtime.address
        )
        runtime.run(announcer.announce_once(), timeout_s=20)
        announcer.start()
    print(json.dumps(info), flush=True)
    try:
        sys.stdin.read()  # serve until the parent closes our stdin (or kills us)
    finally:
        if announcer is not None:
            announcer.close()
        if raw_server is not None:
            runtime.run(raw_server.stop(0.2), timeout_s=2)
        server.close()
        if dht is not None:
            dht.close()
        runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
