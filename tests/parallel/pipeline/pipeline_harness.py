"""An in-process pipeline swarm on 127.0.0.1 for tests: runtimes, DHT nodes, servers, trainer.

Every peer has its own ``NetRuntime`` (its own loop thread) and DHT node, bootstrapped from
the first; ``close()`` closes everything in reverse order. ``kill(server)`` closes a server's
runtime at once (in-flight calls fail as with a dead process) and keeps the object readable.
"""

from __future__ import annotations

import contextlib

import torch

from shoal.dht.peer import DHT
from shoal.models import ModelConfig, model_config
from shoal.net.config import NetConfig
from shoal.net.identity import Identity
from shoal.net.runtime import NetRuntime
from shoal.parallel.pipeline import PipelineTrainer, StageServer, StageServerConfig, TrainerConfig


def tiny(n_layer: int = 4) -> ModelConfig:
    return model_config("tiny", n_layer=n_layer, d_model=64, n_head=4, max_seq_len=64)


class Swarm:
    def __init__(self, cfg: ModelConfig, server_config: StageServerConfig) -> None:
        self.cfg, self.server_config = cfg, server_config
        self.peers: list[tuple[NetRuntime, DHT]] = []
        self.servers: list[StageServer] = []
        self.trainers: list[PipelineTrainer] = []

    def peer(self, net: NetConfig | None = None) -> tuple[NetRuntime, DHT]:
        net = net or NetConfig(port=0, unix_socket=False)
        runtime = NetRuntime(Identity.generate(), net).start()
        dht = DHT(runtime)
        if self.peers:
            dht.bootstrap([self.peers[0][0].address])
        self.peers.append((runtime, dht))
        return runtime, dht

    def server(self, stage: int | str, config: StageServerConfig | None = None) -> StageServer:
        runtime, dht = self.peer()
        server = StageServer(runtime, dht, stage, self.cfg, config or self.server_config).start()
        self.servers.append(server)
        return server

    def trainer(
        self, config: TrainerConfig, net: NetConfig | None = None, **kw: object
    ) -> PipelineTrainer:
        runtime, dht = self.peer(net)
        trainer = PipelineTrainer(runtime, dht, self.cfg, config, **kw)  # type: ignore[arg-type]
        self.trainers.append(trainer)
        return trainer

    def kill(self, server: StageServer) -> None:
        server.dht.close()  # its tasks live on the runtime's loop; stop them before the loop
        server.runtime.close()
        server.core.close()

    def close(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.close()
        for runtime, dht in reversed(self.peers):
            with contextlib.suppress(Exception):
                dht.close()
            runtime.close()


def batches(n: int, batch: int, seq: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` micro-batches of random bytes (inputs, next-byte targets), uint8."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        data = torch.randint(0, 256, (batch, seq + 1), generator=gen, dtype=torch.uint8)
        out.append((data[:, :-1].contiguous(), data[:, 1:].contiguous()))
    return out
