"""A tensor-parallel stage host: build the stage on every rank and run the runner.

``StageSpec`` says which stage to serve (model shape, seed, cut points, stage index,
optimizer settings); it is what rank 0 hands to its spawned followers. Each rank builds the
same dense stage from it, shards it with ``parallelize_tp`` (dense weights broadcast from
rank 0 first, so rank 0 may load a checkpoint before sharding), and wraps it in a
``TPStageRunner``.

``TPStageHost.start(world_size, spec)`` is what ``shoal peer --tp N`` does: this process
becomes rank 0 and gets ``host.runner`` for its stage service; the followers run
``follow_stage`` until ``host.close()`` sends ``STOP`` and joins them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shoal.errors import ConfigError
from shoal.models import GPT, ModelConfig, split_stages
from shoal.parallel.tensor.config import LaunchConfig
from shoal.parallel.tensor.launch import RankContext, TPGroup, start_tp_group
from shoal.parallel.tensor.parallelize import parallelize_tp
from shoal.parallel.tensor.runner import TPStageRunner
from shoal.parallel.tensor.zero import ZeroAdamW

__all__ = ["StageSpec", "TPStageHost", "build_tp_stage", "follow_stage"]


@dataclass(frozen=True, kw_only=True, slots=True)
class StageSpec:
    """Which stage a tensor-parallel group serves, and how it trains."""

    model: ModelConfig
    seed: int = 0
    """Initialisation seed of the dense model (rank 0's weights are broadcast anyway)."""
    boundaries: tuple[int, ...] = ()
    """Block indices where stages 1.. begin (``shoal.models.split_stages``); () = whole model."""
    index: int = 0
    """The stage this group serves."""
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    dtype: str = "float32"
    """Parameter dtype: float32 (bf16 autocast on CUDA) or float64 (exactness tests)."""
    autocast: bool = True
    """bf16 autocast on CUDA; ignored on CPU."""
    overlap: bool = True
    """Overlap the input-gradient all-reduce with weight-gradient compute."""

    def __post_init__(self) -> None:
        if not 0 <= self.index <= len(self.boundaries):
            raise ConfigError(f"tp stage index {self.index} out of range for {self.boundaries}")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"tp stage dtype must be float32 or float64, got {self.dtype!r}")

    def dense_stage(self, model: GPT | None = None) -> nn.Module:
        """The dense stage cut from ``model`` (built from the spec if ``None``)."""
        model = model or GPT(self.model, seed=self.seed)
        model = model.to(getattr(torch, self.dtype))
        if not self.boundaries:  # one stage: keep the head tied, as in the whole model
            return split_stages(model, [], tie="shared")[0]
        return split_stages(model, list(self.boundaries), tie="copy")[self.index]


def build_tp_stage(
    ctx: RankContext, spec: StageSpec, *, dense: nn.Module | None = None
) -> TPStageRunner:
    """Shard ``dense`` (or the spec's dense stage) over ``ctx.comm`` and wrap it in a runner."""
    stage = dense if dense is not None else spec.dense_stage()
    stage = parallelize_tp(stage.to(ctx.device), ctx.comm, overlap=spec.overlap)
    opt = ZeroAdamW(
        stage.parameters(),
        ctx.comm,
        lr=spec.lr,
        betas=spec.betas,
        eps=spec.eps,
        weight_decay=spec.weight_decay,
    )
    use_autocast = spec.autocast and ctx.device.type == "cuda"
    return TPStageRunner(stage, ctx.comm, opt, device=ctx.device, autocast=use_autocast)


def follow_stage(ctx: RankContext, spec: StageSpec) -> dict[str, int]:
    """Follower entry point (spawned): build the stage, execute work items until STOP."""
    runner = build_tp_stage(ctx, spec)
    done = runner.follow()
    return {"rank": ctx.rank, "items": done}


class TPStageHost:
    """Rank 0 of a local tensor-parallel group serving one stage."""

    def __init__(self, group: TPGroup, runner: TPStageRunner) -> None:
        self.group, self.runner = group, runner
        self._closed = False

    @classmethod
    def start(
        cls,
        world_size: int,
        spec: StageSpec,
        *,
        dense: nn.Module | None = None,
        config: LaunchConfig | None = None,
        follower: Callable[..., Any] = follow_stage,
        follower_args: Sequence[Any] | None = None,
    ) -> TPStageHost:
        """Spawn the followers, become rank 0, build the stage (``dense`` if given).

        Raises:
            TPGroupError: the group did not form or a follower failed while building.
        """
        group = start_tp_group(world_size, follower, follower_args or (spec,), config=config)
        try:
            runner = build_tp_stage(group.ctx, spec, dense=dense)
        except BaseException:
            group.close(timeout_s=group.ctx.config.terminate_grace_s)
            raise
        return cls(group, runner)

    def __enter__(self) -> TPStageHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout_s: float | None = None) -> list[Any]:
        """Send STOP, join the followers, destroy the group; idempotent.

        Returns the followers' results (``{"rank", "items"}`` for ``follow_stage``).
        """
        if self._closed:
            return []
        self._closed = True
        try:
            self.runner.stop()
        finally:
            results = self.group.close(timeout_s)
        return results
