"""``StageCore``: the compute side of a stage server (module, optimizer, accumulation).

``StageServer`` (``server.py``) wires it to the network. Requests arrive through the ``Stage`` gRPC service (``service.py``) on the network loop; every
touch of the parameters runs on the server's compute thread (``worker.py``).

Admission and backpressure. At most ``max_queue`` forward requests are admitted (waiting or
computing); one more is answered BUSY at once, before its tensors are read, so the trainer
routes it elsewhere. Backward requests get their own bound of twice that (they finish work
already paid for, and run first on the compute thread).

Backward recomputes. A non-last stage runs its forward without autograd and saves only the
decoded input under the request id (bounded by ``max_saved`` and ``context_ttl_s``, see
``ledger.py``); the backward reruns the forward from that input with the current weights and
differentiates it. A saved autograd graph would hold the very parameter tensors the optimizer
updates in place between a forward and its backward (steps are asynchronous), so it would be
invalid after any step; recomputing costs one more forward per micro-batch and keeps memory
at one input per pending micro-batch. (Dropout would need its RNG state saved; the reference
model trains without dropout.) The last stage runs forward, loss and backward in one call.

Gradients and steps (SWARM style). Each applied backward adds its parameter gradients into
the server's accumulator; after every ``accumulate`` applied backwards the optimizer steps on
their mean and the accumulator is cleared. Gradients are computed into fresh tensors and
added in one place, after a last check of the request's deadline, so a backward is either
applied once before its deadline or not at all. A request id is applied at most once
(``Ledger.applied``); a repeated backward gets the cached answer and changes nothing.
A server that moves to another stage first steps on what it has accumulated.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from shoal.errors import ProtocolViolation
from shoal.models import ModelConfig
from shoal.net.proto.v1 import stage_pb2 as pb
from shoal.parallel.pipeline.codecs import BoundaryCodec
from shoal.parallel.pipeline.config import StageServerConfig
from shoal.parallel.pipeline.ledger import Ledger
from shoal.parallel.pipeline.meter import ThroughputMeter
from shoal.parallel.pipeline.model import build_stage
from shoal.parallel.pipeline.worker import ComputeWorker

__all__ = ["Outcome", "StageCore"]

log = logging.getLogger(__name__)
Outcome = tuple[pb.StageReply, Sequence[torch.Tensor]]


def _reply(status: Any, reason: str = "", **kw: Any) -> pb.StageReply:
    return pb.StageReply(status=status, reason=reason[:200], **kw)


class StageCore:
    """The compute side of a stage server: module, optimizer, ledger, accumulation.

    Methods named ``*_job`` run on the compute thread; the rest are called on the loop.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        config: StageServerConfig,
        stage: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model_config = model_config
        self.config = config
        self.clock = clock
        self.worker = ComputeWorker(f"shoal-stage-{os.getpid()}")
        self.ledger = Ledger(
            max_saved=config.max_saved,
            ttl_s=config.context_ttl_s,
            applied_ttl_s=config.applied_ttl_s,
        )
        self.meter = ThroughputMeter(config.throughput_window_s, config.default_throughput)
        self.pending_forward = 0
        self.pending_backward = 0
        self.steps = 0
        self.accumulated = 0
        self._codecs: dict[tuple[str, int], BoundaryCodec] = {}
        self.stage = -1
        self.module: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.install_job(stage, None)

    # -- parameters ---------------------------------------------------------------------
    def install_job(self, stage: int, state: dict[str, torch.Tensor] | None) -> None:
        """Serve ``stage`` with the seed weights, or ``state`` (checked against them)."""
        cfg = self.config
        module = build_stage(self.model_config, cfg.num_stages, stage, cfg.seed)
        if state is not None:
            own = module.state_dict()
            if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
                raise ProtocolViolation(f"parameters for stage {stage} do not fit its module")
            module.load_state_dict(state)
        module.train()
        params = [p for p in module.parameters() if p.requires_grad]
        if cfg.optimizer == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(
                params, lr=cfg.lr, weight_decay=cfg.weight_decay
            )
        else:
            opt = torch.optim.SGD(params, lr=cfg.lr)
        self.ledger.clear()
        self.module, self.optimizer, self.stage, self.accumulated = module, opt, stage, 0

    def state_job(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def params_job(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.module.parameters()]

    def add_delta_job(self, before: list[torch.Tensor], after: list[torch.Tensor]) -> None:
        """Parameters += after - before (keeps updates made meanwhile)."""
        with torch.no_grad():
            for p, b, a in zip(self.module.parameters(), before, after, strict=True):
                p.add_(a - b)

    def flush_job(self) -> bool:
        """Step on a partial accumulation (before a move); True when it stepped."""
        if self.accumulated == 0:
            return False
        self._step()
        return True

    # -- compute ------------------------------------------------------------------------
    def codec(self, name: str, boundary: int) -> BoundaryCodec:
        key = (name, boundary)
        codec = self._codecs.get(key)
        if codec is None:
            cfg = self.config
            codec = self._codecs[key] = BoundaryCodec(
                name,
                self.model_config.d_model,
                boundary,
                rank=cfg.codec_rank,
                block_size=cfg.codec_block_size,
                seed=cfg.seed,
            )
        return codec

    def _input(self, codec: str, payload: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.module.is_first:
            (ids,) = payload
            if ids.dim() != 2 or ids.dtype != torch.uint8:
                raise ProtocolViolation("stage 0 input must be (B, T) uint8 byte ids")
            if ids.shape[1] > self.model_config.max_seq_len:
                raise ProtocolViolation(f"sequence of {ids.shape[1]} exceeds max_seq_len")
            return ids.long()
        x = self.codec(codec, self.stage - 1).decode(payload)
        if x.shape[1] > self.model_config.max_seq_len:
            raise ProtocolViolation(f"sequence of {x.shape[1]} exceeds max_seq_len")
        return x.detach().requires_grad_(True)

    def _grads(
        self, root: torch.Tensor, grad: torch.Tensor | None, x: torch.Tensor
    ) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
        params = list(self.module.parameters())
        wrt = params + ([x] if x.requires_grad else [])
        grads = torch.autograd.grad(root, wrt, grad, allow_unused=True)
        return list(grads[: len(params)]), (grads[-1] if x.requires_grad else None)

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
        """Accumulate ``grads`` unless the deadline passed; the one place gradients land."""
        if self.clock() > deadline:
            self.ledger.counters.late += 1
            return False
        for p, g in zip(self.module.parameters(), grads, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        self.ledger.mark_applied(rid, mb, answer, self.clock())
        self.meter.record(samples, busy_s, self.clock())
        self.accumulated += 1
        if self.accumulated >= self.config.accumulate:
            self._step()
        return True

    def _step(self) -> None:
        assert self.optimizer is not None
        scale = 1.0 / self.accumulated
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.accumulated = 0

    def forward_job(
        self,
        req: pb.ForwardRequest,
        payload: Sequence[torch.Tensor],
        targets: torch.Tensor | None,
        deadline: float,
    ) -> Outcome:
        start = time.perf_counter()
        if self.clock() > deadline:
            self.ledger.counters.late += 1
            return _reply(pb.EXPIRED, "budget ran out in the queue"), ()
        if req.stage != self.stage:
            return _reply(pb.WRONG_STAGE, f"serving stage {self.stage}"), ()
        rid, module = req.request_id, self.module
        if module.is_last and self.ledger.applied(rid):
            self.ledger.counters.duplicates += 1
            tensors, loss = self.ledger.answer(rid) or ((), float("nan"))
            return _reply(pb.OK, payload_tensors=len(tensors), loss=loss, duplicate=True), tensors
        x = self._input(req.codec, payload)
        self.ledger.counters.forwards += 1
        if not module.is_last:
            with torch.no_grad():
                out = module(x)  # (B, T, C)
            self.ledger.save(rid, x, self.clock())
            tensors = self.codec(req.codec, self.stage).encode(out)
            self.meter.record(0, time.perf_counter() - start, self.clock())
            return _reply(pb.OK, payload_tensors=len(tensors)), tensors
        with torch.enable_grad():
            if targets is None or targets.shape != x.shape[:2] or targets.dtype != torch.uint8:
                raise ProtocolViolation("the last stage needs (B, T) uint8 targets")
            loss = module(x, targets.long())
            grads, grad_in = self._grads(loss, None, x)
        tensors = () if grad_in is None else self.codec(req.codec, self.stage - 1).encode(grad_in)
        value = float(loss.detach())
        if not self._apply(
            rid,
            req.micro_batch,
            grads,
            (tensors, value),
            x.shape[0],
            time.perf_counter() - start,
            deadline,
        ):
            return _reply(pb.EXPIRED, "budget ran out before the gradient was applied"), ()
        return _reply(
            pb.OK, payload_tensors=len(tensors), loss=value, optimizer_steps=self.steps
        ), tensors

    def backward_job(
        self, req: pb.BackwardRequest, payload: Sequence[torch.Tensor], deadline: float
    ) -> Outcome:
        start = time.perf_counter()
        rid, ledger = req.request_id, self.ledger
        if ledger.applied(rid):
            cached = ledger.answer(rid)
            if cached is None:
                return _reply(
                    pb.UNKNOWN_REQUEST, "applied long ago; answer no longer cached", duplicate=True
                ), ()
            ledger.counters.duplicates += 1
            tensors = cached[0]
            return _reply(pb.OK, payload_tensors=len(tensors), duplicate=True), tensors
        if req.stage != self.stage:
            return _reply(pb.WRONG_STAGE, f"serving stage {self.stage}"), ()
        ctx = ledger.take(rid)
        if ctx is None:
            return _reply(pb.UNKNOWN_REQUEST, "no saved forward for this request"), ()
        if self.clock() > deadline:
            ledger.counters.late += 1
            return _reply(pb.EXPIRED, "budget ran out in the queue"), ()
        x = ctx if self.module.is_first else ctx.detach().requires_grad_(True)
        grad = self.codec(req.codec, self.stage).decode(payload)
        if grad.shape != (*x.shape[:2], self.model_config.d_model):
            raise ProtocolViolation(f"gradient {list(grad.shape)} for input {list(x.shape)}")
        with torch.enable_grad():
            out = self.module(x)  # (B, T, C), recomputed with the current weights
            grads, grad_in = self._grads(out, grad, x)
        tensors = () if grad_in is None else self.codec(req.codec, self.stage - 1).encode(grad_in)
        if not self._apply(
            rid,
            req.micro_batch,
            grads,
            (tensors, 0.0),
            x.shape[0],
            time.perf_counter() - start,
            deadline,
        ):
            return _reply(pb.EXPIRED, "budget ran out before the gradient was applied"), ()
        return _reply(pb.OK, payload_tensors=len(tensors), optimizer_steps=self.steps), tensors

    # -- loop side ----------------------------------------------------------------------
    def budget(self, budget_s: float) -> float:
        if not 0 < budget_s <= self.config.max_budget_s:
            raise ProtocolViolation(
                f"budget_s {budget_s!r} outside (0, {self.config.max_budget_s}]"
            )
        return self.clock() + budget_s

    def busy(self, backward: bool) -> bool:
        if backward:
            return self.pending_backward >= 2 * self.config.max_queue
        return self.pending_forward >= self.config.max_queue

    @property
    def queue_length(self) -> int:
        return self.pending_forward + self.pending_backward

    async def run(self, priority: int, fn: Callable[[], Any]) -> Any:
        return await self.worker.submit(priority, fn)

    def info(self) -> pb.StageInfo:
        return pb.StageInfo(
            stage=self.stage,
            num_stages=self.config.num_stages,
            throughput=self.meter.throughput(self.clock()),
            queue_length=self.queue_length,
            max_queue=self.config.max_queue,
            applied=self.ledger.counters.applied,
            optimizer_steps=self.steps,
        )

    def close(self) -> None:
        self.worker.close()
