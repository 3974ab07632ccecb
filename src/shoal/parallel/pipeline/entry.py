"""Entry points for the ``shoal peer`` command: serve a stage, or train through the pipeline.

    serve_stage(stage="auto", join=["203.0.113.5:31337"], stop=event)      # blocks until stop
    run_pipeline_trainer(join=[...], num_stages=4, micro_batches=1000)     # returns results

Each builds its peer (identity, ``NetRuntime``, DHT node joined through ``join``) and closes it
on the way out. The flags these map to are listed in this folder's README.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from shoal.dht.peer import DHT
from shoal.models import ModelConfig, model_config
from shoal.net.config import NetConfig
from shoal.net.identity import Identity
from shoal.net.runtime import NetRuntime
from shoal.parallel.pipeline.config import StageServerConfig, TrainerConfig
from shoal.parallel.pipeline.server import StageServer
from shoal.parallel.pipeline.trainer import MicroBatchResult, PipelineTrainer

__all__ = ["pipeline_model", "run_pipeline_trainer", "serve_stage"]


def pipeline_model(model: str, num_stages: int, **overrides: Any) -> ModelConfig:
    """The named model with at least ``num_stages - 1`` blocks (so every stage holds one)."""
    base = model_config(model, **overrides)
    if base.n_layer + 1 < num_stages:
        base = model_config(model, **{**overrides, "n_layer": num_stages})
    return base


def _peer(key_path: Path | None, net: NetConfig, join: Sequence[str]) -> tuple[NetRuntime, DHT]:
    identity = Identity.load_or_create(key_path) if key_path else Identity.generate()
    runtime = NetRuntime(identity, net).start()
    try:
        dht = DHT(runtime)
        if join:
            dht.bootstrap(list(join))
    except BaseException:
        runtime.close()
        raise
    return runtime, dht


def serve_stage(
    *,
    stage: int | str = "auto",
    model: str = "tiny",
    model_overrides: dict[str, Any] | None = None,
    join: Sequence[str] = (),
    net: NetConfig | None = None,
    key_path: Path | None = None,
    config: StageServerConfig | None = None,
    stop: threading.Event | None = None,
    ready: Callable[[StageServer], None] | None = None,
    server_factory: Callable[..., StageServer] = StageServer,
) -> None:
    """Serve one stage (``"auto"``: the least-served) until ``stop`` is set.

    ``server_factory`` builds the server from ``(runtime, dht, stage, model_config, config)``;
    e.g. a tensor-parallel stage server (``shoal.parallel.tensor``) with its ``tp`` bound.
    It is called on this thread.
    """
    config = config or StageServerConfig()
    cfg = pipeline_model(model, config.num_stages, **(model_overrides or {}))
    runtime, dht = _peer(key_path, net or NetConfig(), join)
    server: StageServer | None = None
    try:
        server = server_factory(runtime, dht, stage, cfg, config).start()
        if ready is not None:
            ready(server)
        (stop or threading.Event()).wait()
    finally:
        if server is not None:
            server.close()
        dht.close()
        runtime.close()


def run_pipeline_trainer(
    *,
    join: Sequence[str],
    model: str = "tiny",
    model_overrides: dict[str, Any] | None = None,
    config: TrainerConfig | None = None,
    net: NetConfig | None = None,
    key_path: Path | None = None,
    micro_batches: int = 100,
    batch_size: int = 8,
    seq_len: int = 128,
    seed: int = 0,
    data: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    timeout_s: float = 3600.0,
) -> list[MicroBatchResult]:
    """Train ``micro_batches`` micro-batches of the embedded corpus (or ``data``)."""
    config = config or TrainerConfig()
    cfg = pipeline_model(model, config.num_stages, **(model_overrides or {}))
    if data is None:
        from shoal.models.data import TrainWindows, load_corpus

        windows = TrainWindows(
            load_corpus().train, seq_len=seq_len, batch_size=batch_size, seed=seed
        )
        data = [
            tuple(t.to(torch.uint8) for t in windows.next_batch())  # type: ignore[misc]
            for _ in range(micro_batches)
        ]
    runtime, dht = _peer(key_path, net or NetConfig(), join)
    try:
        trainer = PipelineTrainer(runtime, dht, cfg, config)
        return trainer.train_blocking(data, timeout_s=timeout_s)
    finally:
        dht.close()
        runtime.close()
