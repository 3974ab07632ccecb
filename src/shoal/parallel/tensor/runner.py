"""A pipeline stage computed by a tensor-parallel group: rank 0 leads, the others follow.

Rank 0 is the only rank that talks to the swarm. For every request it broadcasts a work item
(``workitem.py``: kind and tensors) to the group, then every rank runs the same computation
on its shard, and rank 0 returns the (replicated) result. Followers sit in ``follow()``,
which executes work items until ``STOP``.

Requests (the pipeline's stage calls):

* ``forward(inputs, targets=None)``: outputs, or the loss on the last stage with targets.
* ``backward(inputs, grad_outputs | targets)``: recomputes the forward with autograd (no
  activations are kept between calls), back-propagates, accumulates parameter gradients,
  and returns the gradient of the inputs (``None`` on the first stage, whose inputs are
  byte ids) and the loss (last stage with targets, else ``None``).
* ``step(lr)``: one ``ZeroAdamW`` step on the accumulated gradients, then zeroes them.

Every rank must see the same sequence of work items; only rank 0 may call the request
methods, and one thread at a time (the peer's compute thread).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from shoal.errors import ConfigError
from shoal.parallel.tensor.comm import TPComm
from shoal.parallel.tensor.workitem import HEADER_LEN, Kind, decode_header, encode_header
from shoal.parallel.tensor.zero import ZeroAdamW

__all__ = ["TPStageRunner"]


class TPStageRunner:
    """Executes stage requests on every rank of ``comm``.

    Args:
        stage: the tensor-parallel stage (``parallelize_tp`` applied), on ``device``.
        comm: the tensor-parallel group.
        optimizer: steps the stage's parameters; ``None`` for a forward-only server.
        device: where inputs are moved and computed (``cuda`` with NCCL).
        max_elements: the largest tensor a work item may carry.
        autocast: run forward and backward under bf16 autocast (CUDA only).
    """

    def __init__(
        self,
        stage: nn.Module,
        comm: TPComm,
        optimizer: ZeroAdamW | None = None,
        *,
        device: torch.device | None = None,
        max_elements: int = 1 << 28,
        autocast: bool = False,
    ) -> None:
        self.device = device or torch.device("cpu")
        if autocast and self.device.type != "cuda":
            raise ConfigError("tp autocast (bf16) is only supported on CUDA")
        self.stage, self.comm, self.optimizer = stage, comm, optimizer
        self.max_elements = max_elements
        self.autocast = autocast
        self.items_done = 0
        self._stopped = False

    # ---------------------------------------------------------------- rank 0 requests

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Stage outputs for ``inputs`` (or the loss, given ``targets``), on rank 0."""
        out = self._lead(Kind.FORWARD, [inputs] if targets is None else [inputs, targets])
        assert out[0] is not None
        return out[0]

    def backward(
        self,
        inputs: torch.Tensor,
        grad_outputs: torch.Tensor | None = None,
        *,
        targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(grad of inputs, loss); give ``grad_outputs`` or, on the last stage, ``targets``."""
        if (grad_outputs is None) == (targets is None):
            raise ValueError("backward needs exactly one of grad_outputs and targets")
        second = grad_outputs if grad_outputs is not None else targets
        assert second is not None
        grad_in, loss = self._lead(Kind.BACKWARD, [inputs, second])
        return grad_in, loss

    def step(self, lr: float | None = None) -> None:
        """Optimizer step on every rank (``lr`` replaces the learning rate if given)."""
        value = float("nan") if lr is None else float(lr)
        self._lead(Kind.STEP, [torch.tensor([value], dtype=torch.float64)])

    def zero_grad(self) -> None:
        self._lead(Kind.ZERO_GRAD, [])

    def stop(self) -> None:
        """Release the followers from ``follow()``; idempotent."""
        if not self._stopped:
            self._lead(Kind.STOP, [])

    # ---------------------------------------------------------------- followers

    def follow(self, max_items: int | None = None) -> int:
        """Execute work items from rank 0 until ``STOP`` (or ``max_items``); returns the count.

        Every wait is bounded by the process group's collective timeout: a leader that
        vanishes makes the next broadcast fail instead of hanging.
        """
        if self.comm.rank == 0:
            raise RuntimeError("rank 0 leads; only followers call follow()")
        count = 0
        while not self._stopped and (max_items is None or count < max_items):
            header = self.comm.broadcast(
                torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.device), src=0
            )
            kind, specs = decode_header(header.cpu(), max_elements=self.max_elements)
            tensors = [
                self.comm.broadcast(torch.empty(s.shape, dtype=s.dtype, device=self.device), src=0)
                for s in specs
            ]
            self._execute(kind, tensors)
            count += 1
        return count

    # ---------------------------------------------------------------- shared

    def lead(self, kind: Kind, tensors: Sequence[torch.Tensor] = ()) -> tuple[Any, Any]:
        """Broadcast a work item and execute it here too (rank 0); returns rank 0's result."""
        return self._lead(kind, tensors)

    def _lead(self, kind: Kind, tensors: Sequence[torch.Tensor]) -> tuple[Any, Any]:
        if self.comm.rank != 0:
            raise RuntimeError("only rank 0 sends requests")
        if self._stopped:
            raise RuntimeError("the tensor-parallel stage runner was stopped")
        header = encode_header(kind, tensors)
        decode_header(header, max_elements=self.max_elements)  # same checks as followers
        self.comm.broadcast(header.to(self.device), src=0)
        moved = [
            self.comm.broadcast(t.detach().to(self.device).contiguous(), src=0) for t in tensors
        ]
        return self._execute(kind, moved)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _execute(self, kind: Kind, tensors: list[torch.Tensor]) -> tuple[Any, Any]:
        self.items_done += 1
        if kind is Kind.FORWARD:
            with torch.no_grad(), self._autocast():
                return self.stage(*tensors), None
        if kind is Kind.BACKWARD:
            return self._backward(tensors[0], tensors[1])
        if kind is Kind.STEP:
            if self.optimizer is None:
                raise ConfigError("this tensor-parallel stage has no optimizer")
            lr = float(tensors[0].item())
            if lr == lr:  # not NaN
                self.optimizer.set_lr(lr)
            self.optimizer.step()
            self.optimizer.zero_grad()
        elif kind is Kind.ZERO_GRAD:
            self.stage.zero_grad(set_to_none=True)
        elif kind is Kind.STOP:
            self._stopped = True
        else:
            return self._execute_more(kind, tensors)
        return None, None

    def _execute_more(self, kind: Kind, tensors: list[torch.Tensor]) -> tuple[Any, Any]:
        """Kinds a subclass adds (``pipeline_core.py``); the base runner knows none."""
        raise ConfigError(f"work item kind {kind.name} is not handled by {type(self).__name__}")

    def _backward(self, inputs: torch.Tensor, second: torch.Tensor) -> tuple[Any, Any]:
        x = inputs
        if inputs.is_floating_point():
            x = inputs.detach().requires_grad_(True)
        with torch.enable_grad():
            if second.is_floating_point():  # grad of the outputs
                with self._autocast():
                    out = self.stage(x)
                out.backward(second.to(out.dtype))
                loss = None
            else:  # targets: last stage computes the loss
                with self._autocast():
                    loss = self.stage(x, second)
                loss.backward()
                loss = loss.detach()
        grad = x.grad if x is not inputs else None
        return grad, loss
