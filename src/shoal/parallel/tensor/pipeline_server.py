"""``TPStageServer``: the pipeline's stage server with its stage computed by a TP group.

    server = TPStageServer(runtime, dht, 1, model_config, StageServerConfig(...), tp=2).start()
    ...
    server.close()                  # also stops the follower ranks

Everything the swarm sees (the ``Stage`` service, DHT announcements, averaging, moving between
stages) is the pipeline's ``StageServer``; only its core is a ``TPStageCore``. This process is
rank 0; ``tp - 1`` follower processes are spawned on this host (``launch.py``).
"""

from __future__ import annotations

from typing import Any

from shoal.dht.peer import DHT
from shoal.models import ModelConfig
from shoal.net.runtime import NetRuntime
from shoal.parallel.pipeline.config import StageServerConfig
from shoal.parallel.pipeline.server import StageServer
from shoal.parallel.tensor.config import LaunchConfig
from shoal.parallel.tensor.launch import start_tp_group
from shoal.parallel.tensor.pipeline_core import TPStageCore, follow_pipeline_stage

__all__ = ["TPStageServer"]


class TPStageServer(StageServer):
    """A ``StageServer`` whose stage runs on ``tp`` local ranks (see the module docstring).

    Raises:
        ConfigError: invalid ``tp``, backend, or a non-AdamW optimizer.
        TPGroupError: the local group did not form.
    """

    def __init__(
        self,
        runtime: NetRuntime,
        dht: DHT,
        stage_index: int | str,
        model_config: ModelConfig,
        config: StageServerConfig | None = None,
        *,
        tp: int,
        launch: LaunchConfig | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(runtime, dht, stage_index, model_config, config, **kw)
        dense_core = self.core  # the base class builds a dense core; replace it
        try:
            group = start_tp_group(
                tp, follow_pipeline_stage, (model_config, self.config), config=launch
            )
            try:
                self.core = TPStageCore(model_config, self.config, dense_core.stage, group=group)
            except BaseException:
                group.close(timeout_s=group.ctx.config.terminate_grace_s)
                raise
        finally:
            dense_core.close()
