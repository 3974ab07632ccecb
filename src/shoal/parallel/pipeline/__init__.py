"""SWARM-style pipeline parallelism: stage servers, a randomized router, rebalancing.

See ``README.md`` in this folder for the protocol, the accounting rules and the CLI hooks.
"""

from shoal.parallel.pipeline.codecs import BoundaryCodec
from shoal.parallel.pipeline.config import CODECS, StageServerConfig, TrainerConfig
from shoal.parallel.pipeline.entry import run_pipeline_trainer, serve_stage
from shoal.parallel.pipeline.rebalance import choose_move, initial_stage
from shoal.parallel.pipeline.routing import Candidate, ServerStats, choose_server
from shoal.parallel.pipeline.server import StageServer
from shoal.parallel.pipeline.trainer import MicroBatchResult, PipelineTrainer

__all__ = [
    "CODECS",
    "BoundaryCodec",
    "Candidate",
    "MicroBatchResult",
    "PipelineTrainer",
    "ServerStats",
    "StageServer",
    "StageServerConfig",
    "TrainerConfig",
    "choose_move",
    "choose_server",
    "initial_stage",
    "run_pipeline_trainer",
    "serve_stage",
]
