"""A pipeline stage server whose stage is computed by a local tensor-parallel group.

``TPStageCore`` is the pipeline's ``StageCore`` (admission, ledger, deadlines, accumulation,
codecs: unchanged) with the module replaced by a tensor-parallel group. Rank 0 is the peer
process: the ``Stage`` service, the ledger and the decisions stay there. Every touch of the
parameters becomes a work item that all ranks execute (``StageExecutor``):

=================  ==========================================================
pipeline call      work items
=================  ==========================================================
install_job        INSTALL (rank 0's dense weights are broadcast, then sharded)
forward, no grad   FORWARD
forward + grads    KEEP_FORWARD, GRADS (gradients kept pending on every rank)
_apply             APPLY, or DISCARD when rank 0 found the deadline passed
_step              STEP_MEAN (scale by 1/accumulated, ``ZeroAdamW`` step, zero)
state/params_job   GATHER (dense layout, so TP and dense servers of a stage
                   exchange and average the same tensors)
add_delta_job      ADD_DELTA (one flat dense delta; each rank adds its shard)
=================  ==========================================================

Rank 0 decides apply-or-discard once and tells the group, so a late backward is dropped on
every rank or on none. The optimizer matches the pipeline's: AdamW with betas (0.9, 0.999)
and weight decay on every parameter; ``optimizer="sgd"`` is not offered with TP.

``TPStageServer`` is the pipeline's ``StageServer`` on such a core; ``follow_pipeline_stage``
is the followers' entry point. The core owns the group: ``close()`` stops the followers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from shoal.errors import ConfigError, ProtocolViolation
from shoal.models import ModelConfig
from shoal.parallel.pipeline.config import StageServerConfig
from shoal.parallel.pipeline.core import StageCore
from shoal.parallel.pipeline.model import build_stage
from shoal.parallel.tensor.launch import RankContext, TPGroup
from shoal.parallel.tensor.layers import tp_shard_dim
from shoal.parallel.tensor.parallelize import gather_dense_state, parallelize_tp
from shoal.parallel.tensor.runner import TPStageRunner
from shoal.parallel.tensor.workitem import Kind
from shoal.parallel.tensor.zero import ZeroAdamW

__all__ = ["StageExecutor", "TPStageCore", "follow_pipeline_stage"]


def _dense_shape(p: torch.Tensor, world_size: int) -> torch.Size:
    dim = tp_shard_dim(p)
    if dim is None:
        return p.shape
    shape = list(p.shape)
    shape[dim] *= world_size
    return torch.Size(shape)


class StageExecutor(TPStageRunner):
    """Runs the pipeline's stage work items on every rank of the group."""

    def __init__(
        self, ctx: RankContext, model_config: ModelConfig, config: StageServerConfig
    ) -> None:
        if config.optimizer != "adamw":
            raise ConfigError(f"tensor-parallel stages train with adamw, not {config.optimizer!r}")
        super().__init__(nn.Identity(), ctx.comm, device=ctx.device)
        self.model_config, self.config = model_config, config
        self.prepared: nn.Module | None = None  # rank 0: the dense stage INSTALL shards
        self._kept: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pending: list[torch.Tensor | None] | None = None

    def _execute_more(self, kind: Kind, tensors: list[torch.Tensor]) -> tuple[Any, Any]:
        if kind is Kind.INSTALL:
            self._install(int(tensors[0].item()))
        elif kind is Kind.KEEP_FORWARD:
            return self._keep_forward(tensors), None
        elif kind is Kind.GRADS:
            return self._grads(tensors[0] if tensors else None)
        elif kind is Kind.APPLY:
            self._apply_pending()
        elif kind is Kind.DISCARD:
            self._pending = None
        elif kind is Kind.STEP_MEAN:
            self._step_mean(float(tensors[0].item()))
        elif kind is Kind.GATHER:
            state = gather_dense_state(self.stage, self.comm)
            return {k: v.cpu() for k, v in state.items()}, None
        elif kind is Kind.ADD_DELTA:
            self._add_delta(tensors[0])
        else:
            return super()._execute_more(kind, tensors)
        return None, None

    def _install(self, index: int) -> None:
        cfg = self.config
        dense = (
            self.prepared
            if self.comm.rank == 0 and self.prepared is not None
            else (build_stage(self.model_config, cfg.num_stages, index, cfg.seed))
        )
        self.prepared = None
        stage = parallelize_tp(dense.to(self.device), self.comm)
        stage.train()
        self.stage = stage
        self.optimizer = ZeroAdamW(
            stage.parameters(),
            self.comm,
            lr=cfg.lr,
            betas=(0.9, 0.999),
            weight_decay=cfg.weight_decay,
            decays=lambda p: True,
        )
        self._kept, self._pending = None, None

    def _keep_forward(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        x = tensors[0]
        if x.is_floating_point():
            x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            root = self.stage(x, *tensors[1:])
        self._kept = (root, x)
        return root

    def _grads(self, grad: torch.Tensor | None) -> tuple[Any, Any]:
        if self._kept is None:
            raise ProtocolViolation("GRADS without a kept forward")
        root, x = self._kept
        self._kept = None
        params = list(self.stage.parameters())
        wrt = params + ([x] if x.requires_grad else [])
        with torch.enable_grad():
            grads = torch.autograd.grad(root, wrt, grad, allow_unused=True)
        self._pending = list(grads[: len(params)])
        return self._pending, (grads[-1] if x.requires_grad else None)

    @torch.no_grad()
    def _apply_pending(self) -> None:
        if self._pending is None:
            raise ProtocolViolation("APPLY without pending gradients")
        for p, g in zip(self.stage.parameters(), self._pending, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        self._pending = None

    @torch.no_grad()
    def _step_mean(self, scale: float) -> None:
        assert self.optimizer is not None
        for p in self.stage.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        self.optimizer.step()
        self.optimizer.zero_grad()

    @torch.no_grad()
    def _add_delta(self, flat: torch.Tensor) -> None:
        offset = 0
        for p in self.stage.parameters():
            shape = _dense_shape(p, self.comm.world_size)
            n = shape.numel()
            if offset + n > flat.numel():
                raise ProtocolViolation("ADD_DELTA payload shorter than the parameters")
            delta = flat[offset : offset + n].view(shape)
            dim = tp_shard_dim(p)
            if dim is not None:
                delta = delta.chunk(self.comm.world_size, dim)[self.comm.rank]
            p.add_(delta.to(p.dtype))
            offset += n
        if offset != flat.numel():
            raise ProtocolViolation("ADD_DELTA payload longer than the parameters")


class _LeaderModule(nn.Module):
    """What ``StageCore`` calls as its module on rank 0: every call becomes a work item."""

    def __init__(self, executor: StageExecutor) -> None:
        super().__init__()
        self.executor = executor
        self.inner = executor.stage  # registered: parameters() are rank 0's shards

    @property
    def is_first(self) -> bool:
        return bool(self.inner.is_first)

    @property
    def is_last(self) -> bool:
        return bool(self.inner.is_last)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        tensors = [x] if targets is None else [x, targets]
        kind = Kind.KEEP_FORWARD if torch.is_grad_enabled() else Kind.FORWARD
        out = self.executor.lead(kind, tensors)[0]
        return out if kind is Kind.KEEP_FORWARD else out.cpu()


class TPStageCore(StageCore):
    """``StageCore`` computed by a tensor-parallel group (see the module docstring)."""

    def __init__(
        self,
        model_config: ModelConfig,
        config: StageServerConfig,
        stage: int,
        *,
        group: TPGroup,
        **kw: Any,
    ) -> None:
        self.group = group
        self._group_closed = False
        self.follower_results: list[Any] = []
        self.executor = StageExecutor(group.ctx, model_config, config)
        super().__init__(model_config, config, stage, **kw)

    def install_job(self, stage: int, state: dict[str, torch.Tensor] | None) -> None:
        cfg = self.config
        dense = build_stage(self.model_config, cfg.num_stages, stage, cfg.seed)
        if state is not None:
            own = dense.state_dict()
            if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
                raise ProtocolViolation(f"parameters for stage {stage} do not fit its module")
            dense.load_state_dict(state)
        self.executor.prepared = dense
        self.executor.lead(Kind.INSTALL, [torch.tensor([stage], dtype=torch.int64)])
        self.module = _LeaderModule(self.executor)
        self.optimizer = None  # the executor's ZeroAdamW steps; see _step
        self.ledger.clear()
        self.stage, self.accumulated = stage, 0

    def state_job(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = self.executor.lead(Kind.GATHER)[0]
        return state

    def params_job(self) -> list[torch.Tensor]:
        return list(self.state_job().values())

    def add_delta_job(self, before: list[torch.Tensor], after: list[torch.Tensor]) -> None:
        flat = torch.cat([(a - b).reshape(-1) for b, a in zip(before, after, strict=True)])
        self.executor.lead(Kind.ADD_DELTA, [flat])

    def _grads(
        self, root: torch.Tensor, grad: torch.Tensor | None, x: torch.Tensor
    ) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
        grads, grad_in = self.executor.lead(Kind.GRADS, [] if grad is None else [grad])
        return grads, (grad_in.cpu() if grad_in is not None else None)

    def _apply(
        self,
        rid: bytes,
        mb: int,
        grads: list[torch.Tensor | None],
        answer: Any,
        samples: int,
        busy_s: float,
        deadline: float,
    ) -> bool:
        if self.clock() > deadline:  # decided once, here, for the whole group
            self.executor.lead(Kind.DISCARD)
            return super()._apply(rid, mb, grads, answer, samples, busy_s, -math.inf)
        self.executor.lead(Kind.APPLY)
        placeholders: list[torch.Tensor | None] = [None] * len(grads)  # added by APPLY
        return super()._apply(rid, mb, placeholders, answer, samples, busy_s, math.inf)

    def _step(self) -> None:
        scale = torch.tensor([1.0 / self.accumulated], dtype=torch.float64)
        self.executor.lead(Kind.STEP_MEAN, [scale])
        self.steps += 1
        self.accumulated = 0

    def close(self) -> None:
        """Stop the compute thread, release the followers, tear the group down; idempotent."""
        super().close()  # the compute thread finishes its job (bounded by the worker)
        if self._group_closed:
            return
        self._group_closed = True
        thread = getattr(self.worker, "_thread", None)
        try:
            if thread is None or not thread.is_alive():  # never two threads in collectives
                self.executor.stop()
        finally:
            # followers that did not get STOP are killed after the group's timeout
            self.follower_results = self.group.close()


def follow_pipeline_stage(
    ctx: RankContext, model_config: ModelConfig, config: StageServerConfig
) -> dict[str, int]:
    """Follower entry point (spawned by ``TPStageServer``): execute work items until STOP."""
    executor = StageExecutor(ctx, model_config, config)
    return {"rank": ctx.rank, "items": executor.follow()}
