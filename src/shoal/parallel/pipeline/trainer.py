"""``PipelineTrainer``: routes micro-batches through one server per stage, many at a time.

    trainer = PipelineTrainer(runtime, dht, model_config, TrainerConfig(codec="int8"))
    results = trainer.train_blocking(batches, timeout_s=600)   # [(inputs, targets)] uint8

A micro-batch's path: forward at stages 0..S-2 (each server keeps its activations), then the
last stage runs forward + loss + backward in one call, then backward at stages S-2..0 on the
servers that hold the forwards. The trainer relays payloads between stages unchanged (it never
decodes them) and keeps each stage's input payload until the micro-batch ends.

Retries (no sample lost, no gradient applied twice):

* A forward that fails (unreachable, deadline, BUSY, WRONG_STAGE, EXPIRED) is sent again, to
  another server of the *same* stage when possible, with a fresh request id; the path resumes
  from the failed stage (earlier stages keep their saved activations).
* A backward is sent to the server that holds the forward, under the forward's request id.
  After a deadline it is sent there once more (a server applies a request id at most once and
  answers a repeat from its cache). If that server is gone or lost the context (UNKNOWN,
  EXPIRED, WRONG_STAGE), the forward of that stage is redone on another server from the kept
  input, and the backward follows there under the new id.
* Servers apply a gradient only before their deadline, which is ``0.8 x call_budget_s`` after
  they receive the request, so a call the trainer gave up on cannot be applied afterwards
  unless the link took more than 20% of the budget. Known limit: a server that applied, then
  lost its link before answering and comes back later keeps that gradient while the retry
  applies it elsewhere too.

Failing servers are banned (``ServerStats.ban``, doubling per ban); BUSY only parks a server
for ``busy_backoff_s``. ``acks`` of each result names, per stage, the (server, request id) whose
application the trainer saw: the ground truth that tests compare with the servers' counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from shoal.dht.peer import DHT
from shoal.errors import NetworkError, PeerTimeout, PeerUnavailable, ProtocolViolation
from shoal.models import ModelConfig
from shoal.net.aio import within
from shoal.net.identity import PeerID
from shoal.net.proto.v1 import stage_pb2 as pb
from shoal.net.proto.v1 import stage_pb2_grpc as rpc
from shoal.net.runtime import NetRuntime
from shoal.net.tensors import TensorReader, meta_frame, tensor_frames
from shoal.parallel.pipeline.config import TrainerConfig
from shoal.parallel.pipeline.directory import read_stage
from shoal.parallel.pipeline.routing import Candidate, ServerStats, choose_server

__all__ = ["MicroBatchResult", "PipelineTrainer", "TrainerCounters"]

log = logging.getLogger(__name__)
_SERVER_SHARE = 0.8
_MAX_BUSY = 200
_MAX_ANNOUNCEMENT_AGE_S = 180.0  # sanity bound; records also expire in the DHT


@dataclass(slots=True)
class MicroBatchResult:
    micro_batch: int
    loss: float = math.nan
    error: str = ""
    acks: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    """stage -> (server PeerID raw, request id) whose gradient application was acknowledged."""
    seconds: float = 0.0


@dataclass(slots=True)
class TrainerCounters:
    calls: int = 0
    failures: int = 0
    busy: int = 0
    reforwards: int = 0
    wire_bytes: int = 0
    """Bytes of boundary payloads (activations and their gradients) sent and received."""
    fp32_bytes: int = 0
    """Bytes the same boundary tensors take in fp32."""


class PipelineTrainer:
    """Client of the stage servers (see the module docstring)."""

    def __init__(
        self,
        runtime: NetRuntime,
        dht: DHT,
        model_config: ModelConfig,
        config: TrainerConfig | None = None,
        *,
        rng: random.Random | None = None,
        address_map: Callable[[str], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.runtime, self.dht = runtime, dht
        self.model_config = model_config
        self.config = config or TrainerConfig()
        self.rng = rng or random.Random()
        self.address_map = address_map or (lambda a: a)
        self.clock, self.wall_clock = clock, wall_clock
        self.stats: dict[bytes, ServerStats] = {}
        self.counters = TrainerCounters()
        self._candidates: list[list[Candidate]] = [[] for _ in range(self.config.num_stages)]
        self._refreshed_at = -math.inf
        self._refresh_lock: asyncio.Lock | None = None
        self._stubs: dict[tuple[str, bytes], Any] = {}

    # -- directory ----------------------------------------------------------------------
    async def refresh(self, force: bool = False) -> None:
        if self._refresh_lock is None:
            self._refresh_lock = asyncio.Lock()
        async with self._refresh_lock:
            if not force and self.clock() - self._refreshed_at < self.config.refresh_period_s:
                return
            cfg = self.config
            lists = await asyncio.gather(
                *(
                    read_stage(
                        self.dht.node, cfg.prefix, k, self.wall_clock(), _MAX_ANNOUNCEMENT_AGE_S
                    )
                    for k in range(cfg.num_stages)
                )
            )
            self._candidates = list(lists)
            self._refreshed_at = self.clock()

    def candidates(self, stage: int) -> list[Candidate]:
        return list(self._candidates[stage])

    async def _pick(self, stage: int, exclude: frozenset[bytes]) -> Candidate:
        deadline = self.clock() + self.config.call_budget_s
        force = False
        while True:
            await self.refresh(force)
            cand = choose_server(
                self._candidates[stage], self.stats, self.rng, self.clock(), exclude
            )
            if cand is None and exclude:
                cand = choose_server(self._candidates[stage], self.stats, self.rng, self.clock())
            if cand is not None:
                return cand
            if self.clock() > deadline:
                raise PeerUnavailable(f"no usable server for stage {stage}")
            force = True
            await asyncio.sleep(self.config.refresh_period_s)

    def _stat(self, peer: bytes) -> ServerStats:
        return self.stats.setdefault(peer, ServerStats())

    def _failed(self, cand: Candidate, exc: Exception) -> None:
        self.counters.failures += 1
        until = self._stat(cand.peer).ban(self.clock(), self.config.ban_s)
        log.info(
            "server %s failed (%s); banned for %.1f s", cand.address, exc, until - self.clock()
        )

    # -- one call -----------------------------------------------------------------------
    async def _call(
        self, cand: Candidate, method: str, meta: Any, tensors: Sequence[torch.Tensor]
    ) -> tuple[pb.StageReply, list[torch.Tensor]]:
        key = (cand.address, cand.peer)
        stub = self._stubs.get(key)
        if stub is None:
            stub = self._stubs[key] = self.runtime.stub(
                rpc.StageStub, self.address_map(cand.address), PeerID(cand.peer)
            )
        budget = self.config.call_budget_s
        frames = itertools.chain([meta_frame(meta)], *(tensor_frames(t) for t in tensors))
        stat = self._stat(cand.peer)
        stat.inflight += 1
        self.counters.calls += 1
        start = self.clock()

        async def exchange() -> tuple[pb.StageReply, list[torch.Tensor]]:
            stream = getattr(stub, method)(frames, timeout_s=budget)
            reader = TensorReader(stream, self.runtime.config.tensor_limits)
            reply = await reader.read_meta(pb.StageReply)
            if reply.payload_tensors > 2:
                raise ProtocolViolation(f"{reply.payload_tensors} tensors in a stage reply")
            out = [await reader.read_tensor() for _ in range(reply.payload_tensors)]
            if reply.status != pb.OK:
                # refused before reading our tensors (BUSY, ...): the answer is complete
                # while our request may still be streaming; end the call here.
                await stream.aclose()
                return reply, out
            async for _ in stream:
                raise ProtocolViolation("extra frames after a stage reply")
            return reply, out

        try:
            reply, out = await within(exchange(), budget)
        except asyncio.TimeoutError:
            raise PeerTimeout(
                f"Stage/{method} took more than {budget} s", peer=cand.address
            ) from None
        finally:
            stat.inflight -= 1
        if reply.status == pb.OK:
            work_s = 1.0 / max(cand.throughput, 1e-3)
            stat.observe_latency(max(0.0, self.clock() - start - work_s), self.config.latency_alpha)
        return reply, out

    def _count(self, tensors: Sequence[torch.Tensor], shape: Sequence[int]) -> None:
        self.counters.wire_bytes += sum(t.numel() * t.element_size() for t in tensors)
        self.counters.fp32_bytes += 4 * math.prod(shape[:2]) * self.model_config.d_model

    # -- hops ---------------------------------------------------------------------------
    async def _forward(
        self,
        stage: int,
        mb: int,
        payload: Sequence[torch.Tensor],
        targets: torch.Tensor | None,
        exclude: frozenset[bytes] = frozenset(),
    ) -> tuple[Candidate, bytes, pb.StageReply, list[torch.Tensor]]:
        cfg = self.config
        attempts = busy = 0
        tensors = [*payload, *([] if targets is None else [targets])]
        while True:
            cand = await self._pick(stage, exclude)
            rid = os.urandom(16)
            req = pb.ForwardRequest(
                request_id=rid,
                stage=stage,
                codec=cfg.codec,
                payload_tensors=len(payload),
                budget_s=cfg.call_budget_s * _SERVER_SHARE,
                has_targets=targets is not None,
                micro_batch=mb,
            )
            try:
                reply, out = await self._call(cand, "Forward", req, tensors)
            except NetworkError as exc:
                self._failed(cand, exc)
                attempts += 1
                exclude = exclude | {cand.peer}
                if attempts >= cfg.max_attempts:
                    raise
                continue
            if reply.status == pb.OK:
                return cand, rid, reply, out
            if reply.status == pb.BUSY:
                self.counters.busy += 1
                busy += 1
                self._stat(cand.peer).busy_until = self.clock() + cfg.busy_backoff_s
                if busy >= _MAX_BUSY:
                    raise PeerUnavailable(f"every server of stage {stage} stayed busy")
                await asyncio.sleep(cfg.busy_backoff_s * self.rng.uniform(0.5, 1.5))
                continue
            attempts += 1
            exclude = exclude | {cand.peer}
            if attempts >= cfg.max_attempts:
                raise PeerUnavailable(f"stage {stage}: {reply.reason}", peer=cand.address)

    async def _backward(
        self,
        stage: int,
        mb: int,
        held: tuple[Candidate, bytes],
        inputs: Sequence[torch.Tensor],
        grad: Sequence[torch.Tensor],
    ) -> tuple[tuple[Candidate, bytes], list[torch.Tensor]]:
        cfg = self.config
        cand, rid = held
        attempts = busy = 0
        resent = False
        while True:
            req = pb.BackwardRequest(
                request_id=rid,
                stage=stage,
                codec=cfg.codec,
                payload_tensors=len(grad),
                budget_s=cfg.call_budget_s * _SERVER_SHARE,
                micro_batch=mb,
            )
            lost = ""
            try:
                reply, out = await self._call(cand, "Backward", req, grad)
            except PeerTimeout as exc:
                if not resent:  # it may have applied: ask again under the same id
                    resent = True
                    continue
                self._failed(cand, exc)
                lost = str(exc)
            except NetworkError as exc:
                self._failed(cand, exc)
                lost = str(exc)
            else:
                if reply.status == pb.OK:
                    return (cand, rid), out
                if reply.status == pb.BUSY:
                    self.counters.busy += 1
                    busy += 1
                    if busy >= _MAX_BUSY:
                        raise PeerUnavailable(f"stage {stage} server stayed busy")
                    await asyncio.sleep(cfg.busy_backoff_s * self.rng.uniform(0.5, 1.5))
                    continue
                lost = reply.reason
            attempts += 1
            if attempts >= cfg.max_attempts:
                raise PeerUnavailable(f"backward at stage {stage} failed: {lost}")
            self.counters.reforwards += 1
            cand, rid, _, _ = await self._forward(stage, mb, inputs, None, frozenset({cand.peer}))
            resent = False

    # -- micro-batches ------------------------------------------------------------------
    async def run_micro_batch(
        self, mb: int, inputs: torch.Tensor, targets: torch.Tensor
    ) -> MicroBatchResult:
        """One micro-batch through every stage; raises NetworkError when retries run out."""
        n = self.config.num_stages
        start = self.clock()
        result = MicroBatchResult(mb)
        shape = tuple(inputs.shape)
        stage_inputs: list[list[torch.Tensor]] = [[inputs.to(torch.uint8).contiguous()]]
        held: list[tuple[Candidate, bytes]] = []
        grad: list[torch.Tensor] = []
        for k in range(n):
            last = k == n - 1
            cand, rid, reply, out = await self._forward(
                k, mb, stage_inputs[k], targets.to(torch.uint8).contiguous() if last else None
            )
            if last:
                result.loss = reply.loss
                result.acks[k] = (cand.peer, rid)
                grad = out
                if k > 0:
                    self._count(grad, shape)
            else:
                held.append((cand, rid))
                stage_inputs.append(out)
                self._count(out, shape)
        for k in range(n - 2, -1, -1):
            (cand, rid), grad_in = await self._backward(k, mb, held[k], stage_inputs[k], grad)
            result.acks[k] = (cand.peer, rid)
            self._count(grad, shape)
            grad = grad_in
        result.seconds = self.clock() - start
        return result

    async def train(
        self,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        on_result: Callable[[MicroBatchResult], None] | None = None,
    ) -> list[MicroBatchResult]:
        """Run every micro-batch with up to ``max_inflight`` in flight; failures are recorded
        in their result (``error``), never raised, so one lost path does not stop the rest."""
        sem = asyncio.Semaphore(self.config.max_inflight)
        results: list[MicroBatchResult] = []

        async def one(mb: int, x: torch.Tensor, y: torch.Tensor) -> None:
            try:
                res = await self.run_micro_batch(mb, x, y)
            except NetworkError as exc:
                res = MicroBatchResult(mb, error=str(exc))
            finally:
                sem.release()
            results.append(res)
            if on_result is not None:
                with contextlib.suppress(Exception):
                    on_result(res)

        tasks: set[asyncio.Task[None]] = set()
        try:
            for mb, (x, y) in enumerate(batches):
                await sem.acquire()
                tasks.add(asyncio.ensure_future(one(mb, x, y)))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        return sorted(results, key=lambda r: r.micro_batch)

    def train_blocking(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], timeout_s: float
    ) -> list[MicroBatchResult]:
        """``train`` from a thread other than the network loop."""
        return self.runtime.run(self.train(batches), timeout_s=timeout_s)
