"""``StageServer``: one peer serving one pipeline stage over the ``Stage`` gRPC service.

    server = StageServer(runtime, dht, 2, model_config, StageServerConfig(...)).start()
    ...                       # or stage_index="auto": the least-served stage at start
    server.close()

It announces itself in the DHT (``directory.py``) every ``announce_period_s`` with its rolling
throughput and queue; serves forward/backward (``core.py`` has the compute and accounting
rules, ``service.py`` the framing); averages its parameters with the other servers of its stage
every ``average_period_s`` (``averaging.py``); and every ``rebalance_period_s`` decides whether
to move to a less-served stage (``rebalance.py``). Moving: step on the accumulated gradient,
announce "left" on the old stage, load the target stage's parameters from one of its servers
(``Stage/Parameters``) or from the seed when nobody serves it, announce on the new stage.
Requests for the old stage are answered WRONG_STAGE from then on.

The blocking methods (``start``, ``close``, ``move_to_blocking``) are for other threads; the
coroutines run on the runtime's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from shoal.dht.peer import DHT
from shoal.errors import ConfigError, NetworkError, PeerTimeout, ShoalError
from shoal.models import ModelConfig
from shoal.net.aio import within
from shoal.net.proto.v1 import stage_pb2 as pb
from shoal.net.proto.v1 import stage_pb2_grpc as rpc
from shoal.net.runtime import NetRuntime
from shoal.parallel.pipeline.config import StageServerConfig
from shoal.parallel.pipeline.core import Outcome, StageCore
from shoal.parallel.pipeline.directory import announce, read_stage
from shoal.parallel.pipeline.rebalance import choose_move, initial_stage, stage_totals
from shoal.parallel.pipeline.routing import Candidate
from shoal.parallel.pipeline.service import StageService, read_parameters
from shoal.parallel.pipeline.worker import BACKWARD, CONTROL, FORWARD

__all__ = ["StageServer"]

log = logging.getLogger(__name__)
_SERVICE = "shoal.v1.Stage"
_MAX_PARAM_TENSORS = 4096


class StageServer:
    """Serves one stage of the pipeline (see the module docstring)."""

    def __init__(
        self,
        runtime: NetRuntime,
        dht: DHT,
        stage_index: int | str,
        model_config: ModelConfig,
        config: StageServerConfig | None = None,
        *,
        averaging_transport: Any = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.runtime, self.dht = runtime, dht
        self.config = config or StageServerConfig()
        self.model_config = model_config
        self.wall_clock = wall_clock
        if stage_index != "auto" and not (
            isinstance(stage_index, int) and 0 <= stage_index < self.config.num_stages
        ):
            raise ConfigError(
                f"stage_index must be 'auto' or in [0, {self.config.num_stages})"
                f", got {stage_index!r}"
            )
        self.requested = stage_index
        self.core = StageCore(
            model_config, self.config, stage_index if isinstance(stage_index, int) else 0
        )
        self.moves = 0
        self.moved = threading.Event()
        """Set after each move (for tests and supervisors on other threads)."""
        self.averaging_rounds = 0
        self._moved_at = time.monotonic()
        self._averaging_transport = averaging_transport
        self._tasks: list[asyncio.Task[Any]] = []
        self._closed = False
        self._rng = random.Random(runtime.peer_id.raw)

    @property
    def stage(self) -> int:
        return self.core.stage

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> StageServer:
        """Pick the stage (``auto``), load its weights, serve and announce. Blocking."""
        self.runtime.run(self._start(), timeout_s=timeout_s)
        return self

    async def _start(self) -> None:
        target = self.requested
        if target == "auto":
            counts, totals, _ = await self._survey()
            target = initial_stage(counts, totals)
        assert isinstance(target, int)
        await self._load(target)
        self.runtime.add_servicer(rpc.add_StageServicer_to_server, StageService(self))
        self.runtime.roles.append("stage")
        await self._announce(active=True)
        cfg = self.config
        self._tasks.append(
            self.runtime.spawn(
                self._every(cfg.announce_period_s, self._announce), name="stage-announce"
            )
        )
        if cfg.average_period_s > 0:
            from shoal.parallel.pipeline.averaging import StageAveraging

            self.averaging = StageAveraging(self, self._averaging_transport)
            self._tasks.append(self.runtime.spawn(self.averaging.loop(), name="stage-average"))
        if cfg.rebalance_period_s > 0:
            self._tasks.append(
                self.runtime.spawn(
                    self._every(cfg.rebalance_period_s, self.rebalance), name="stage-rebalance"
                )
            )

    async def _every(self, period_s: float, fn: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(period_s * self._rng.uniform(0.8, 1.2))
            try:
                await fn()
            except (ShoalError, asyncio.TimeoutError) as exc:
                log.warning("stage server %s: %s", fn.__name__, exc)

    def close(self) -> None:
        """Stop serving and computing, announce "left" (best effort). Idempotent, <= 2 s."""
        if self._closed:
            return
        self._closed = True
        if self.runtime.state.value == "running":
            with contextlib.suppress(ShoalError, RuntimeError):
                self.runtime.run(self._stop(), timeout_s=2.0)
        self.core.close()

    async def _stop(self) -> None:
        self.runtime.remove_service(_SERVICE)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(ShoalError, asyncio.TimeoutError):  # best effort: leave now
            await within(self._announce(active=False), 1.0)

    # -- requests (called by the service on the loop) -----------------------------------
    def admit(self, *, backward: bool) -> pb.StageReply | None:
        """None when admitted (call ``release`` later), else the BUSY reply."""
        core = self.core
        if core.busy(backward):
            return pb.StageReply(
                status=pb.BUSY, reason="queue full: route elsewhere", queue_length=core.queue_length
            )
        if backward:
            core.pending_backward += 1
        else:
            core.pending_forward += 1
        return None

    def release(self, *, backward: bool) -> None:
        if backward:
            self.core.pending_backward -= 1
        else:
            self.core.pending_forward -= 1

    async def forward(
        self, req: pb.ForwardRequest, payload: Sequence[torch.Tensor], targets: torch.Tensor | None
    ) -> Outcome:
        core = self.core
        deadline = core.budget(req.budget_s)
        fut = core.worker.submit(FORWARD, lambda: core.forward_job(req, payload, targets, deadline))
        return await self._wait(fut, req.budget_s)

    async def backward(self, req: pb.BackwardRequest, payload: Sequence[torch.Tensor]) -> Outcome:
        core = self.core
        deadline = core.budget(req.budget_s)
        fut = core.worker.submit(BACKWARD, lambda: core.backward_job(req, payload, deadline))
        return await self._wait(fut, req.budget_s)

    @staticmethod
    async def _wait(fut: asyncio.Future[Outcome], budget_s: float) -> Outcome:
        """The job's outcome; past the budget the job discards itself (it checks the deadline
        before applying anything), so giving up here cannot hide an applied gradient."""
        try:
            return await within(fut, budget_s + 1.0)
        except asyncio.TimeoutError:
            raise PeerTimeout(f"stage compute did not finish within {budget_s:.1f} s") from None

    async def parameters(self, stage: int) -> tuple[int, int, dict[str, torch.Tensor]]:
        if stage != self.core.stage:
            raise ConfigError(f"serving stage {self.core.stage}, not {stage}")
        state = await self.core.worker.submit(CONTROL, self.core.state_job)
        return self.core.stage, self.core.steps, state

    # -- DHT ------------------------------------------------------------------------------
    async def _announce(self, active: bool = True, stage: int | None = None) -> None:
        cfg, core = self.config, self.core
        now = self.wall_clock()
        ann = pb.StageAnnouncement(
            address=self.runtime.address,
            stage=core.stage if stage is None else stage,
            num_stages=cfg.num_stages,
            throughput=core.meter.throughput(core.clock()),
            queue_length=core.queue_length,
            active=active,
            announced_at=now,
        )
        await announce(self.dht.node, cfg.prefix, ann, now + cfg.announce_ttl_s)

    async def read(self, stage: int) -> list[Candidate]:
        return await read_stage(
            self.dht.node, self.config.prefix, stage, self.wall_clock(), self.config.announce_ttl_s
        )

    async def _survey(self) -> tuple[list[int], list[float], list[list[Candidate]]]:
        n = self.config.num_stages
        lists = list(await asyncio.gather(*(self.read(k) for k in range(n))))
        counts = [len(c) for c in lists]
        totals = stage_totals(n, [(k, c.throughput) for k in range(n) for c in lists[k]])
        return counts, totals, lists

    # -- moving -----------------------------------------------------------------------------
    async def _load(self, stage: int) -> None:
        """Install ``stage`` with parameters from a peer serving it, else from the seed."""
        me = self.runtime.peer_id.raw
        state = None
        for cand in [c for c in await self.read(stage) if c.peer != me]:
            try:
                state = await self.fetch_parameters(cand, stage)
                break
            except (NetworkError, ConfigError, asyncio.TimeoutError) as exc:
                log.warning("parameters of stage %d from %s failed: %s", stage, cand.address, exc)
        await self.core.worker.submit(CONTROL, lambda: self.core.install_job(stage, state))
        self.loaded_from = "peer" if state is not None else "seed"

    async def fetch_parameters(
        self, cand: Candidate, stage: int, timeout_s: float = 60.0
    ) -> dict[str, torch.Tensor]:
        from shoal.net.identity import PeerID

        stub = self.runtime.stub(rpc.StageStub, cand.address, PeerID(cand.peer))
        frames = stub.Parameters(pb.ParametersRequest(stage=stage), timeout_s=timeout_s)
        info, state = await read_parameters(
            frames, self.runtime.config.tensor_limits, _MAX_PARAM_TENSORS
        )
        if info.stage != stage:
            raise ConfigError(f"peer sent stage {info.stage}, asked for {stage}")
        return state

    async def move_to(self, stage: int) -> None:
        """Leave the current stage for ``stage`` (see the module docstring)."""
        old = self.core.stage
        if stage == old:
            return
        await self.core.worker.submit(CONTROL, self.core.flush_job)
        await self._announce(active=False, stage=old)
        await self._load(stage)
        await self._announce(active=True)
        self.moves += 1
        self._moved_at = time.monotonic()
        self.moved.set()
        log.info("stage server moved from stage %d to %d", old, stage)

    def move_to_blocking(self, stage: int, timeout_s: float = 60.0) -> None:
        self.runtime.run(self.move_to(stage), timeout_s=timeout_s)

    async def rebalance(self) -> int | None:
        """Evaluate ``choose_move`` once and move if it says so; returns the new stage."""
        counts, totals, lists = await self._survey()
        me, cur = self.runtime.peer_id.raw, self.core.stage
        mine = self.core.meter.throughput(self.core.clock())
        if all(c.peer != me for c in lists[cur]):  # our announcement may lag: count us in
            counts[cur] += 1
            totals[cur] += mine
            lists[cur].append(Candidate(me, self.runtime.address, mine, 0))
        rank = sorted(c.peer for c in lists[cur]).index(me)
        target = choose_move(
            cur,
            rank,
            mine,
            counts,
            totals,
            hysteresis=self.config.rebalance_hysteresis,
            since_move_s=time.monotonic() - self._moved_at,
            min_dwell_s=self.config.min_dwell_s,
        )
        if target is not None:
            await self.move_to(target)
        return target
