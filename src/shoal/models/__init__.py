"""models layer: the reference byte-level GPT, its pipeline stages, and the embedded data.

A leaf layer: imports only torch and ``shoal.errors``, never the swarm.
"""

from shoal.models.config import MODEL_SIZES, ModelConfig, model_config
from shoal.models.gpt import GPT, init_weights, lm_loss
from shoal.models.stages import Stage, split_stages, stage_ranges

__all__ = [
    "GPT",
    "MODEL_SIZES",
    "ModelConfig",
    "Stage",
    "init_weights",
    "lm_loss",
    "model_config",
    "split_stages",
    "stage_ranges",
]
