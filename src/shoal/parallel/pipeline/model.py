"""The stage modules a pipeline serves: the reference GPT cut evenly at block boundaries.

``stage_boundaries(n_layer, num_stages)`` spreads the blocks as evenly as possible;
``build_stage`` builds the whole model from the run's seed (every peer gets the same initial
weights) and keeps stage ``k``. The tied embedding is untied (``tie="copy"``): stage 0 trains
the input embedding and the last stage its own copy as the output head, each with its own
optimizer (servers of different stages share no parameters).
"""

from __future__ import annotations

from shoal.errors import ConfigError
from shoal.models import GPT, ModelConfig, Stage, split_stages

__all__ = ["build_stage", "build_stages", "stage_boundaries"]


def stage_boundaries(n_layer: int, num_stages: int) -> list[int]:
    """Block indices where stages 1.. begin (``num_stages <= n_layer + 1``)."""
    if not 1 <= num_stages <= n_layer + 1:
        raise ConfigError(
            f"num_stages must be in [1, {n_layer + 1}] for {n_layer} blocks, got {num_stages}"
        )
    if num_stages <= n_layer:
        return [round(i * n_layer / num_stages) for i in range(1, num_stages)]
    return list(range(1, n_layer + 1))


def build_stages(cfg: ModelConfig, num_stages: int, seed: int) -> list[Stage]:
    """Every stage of the seed-initialised model (untied head)."""
    model = GPT(cfg, seed=seed)
    return split_stages(model, stage_boundaries(cfg.n_layer, num_stages), tie="copy")


def build_stage(cfg: ModelConfig, num_stages: int, stage: int, seed: int) -> Stage:
    """Stage ``stage`` of the seed-initialised model."""
    if not 0 <= stage < num_stages:
        raise ConfigError(f"stage must be in [0, {num_stages}), got {stage}")
    return build_stages(cfg, num_stages, seed)[stage]
