"""Same-stage servers keep their weights together with the data-parallel averager.

Every ``average_period_s`` (aligned on the wall clock, so peers start together) a server reads
the servers of its stage from the DHT; when there are two or more, they form one group
(members sorted by PeerID, round id derived from the stage and the period number, so every
member derives the same) and average their parameters with ``shoal.parallel.data.Averager``.
The averaged values are applied as a delta (``params += avg - snapshot``) on the compute
thread, so updates made while the round ran are kept. Members that disagree about the
group (an announcement arrived late) fail the round with tensors untouched; the next period
tries again. Optimizer state is not averaged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from typing import TYPE_CHECKING, Any

from shoal.net.identity import PeerID
from shoal.parallel.data.averager import Averager, GroupSpec
from shoal.parallel.pipeline.worker import CONTROL

if TYPE_CHECKING:
    from shoal.parallel.pipeline.server import StageServer

__all__ = ["StageAveraging", "round_id"]

log = logging.getLogger(__name__)


def round_id(prefix: str, stage: int, epoch: int) -> bytes:
    """The id every member of a stage derives for period ``epoch`` (16 bytes)."""
    return hashlib.blake2b(f"{prefix}/average/{stage}/{epoch}".encode(), digest_size=16).digest()


class StageAveraging:
    """Periodic parameter averaging among the servers of one stage."""

    def __init__(self, server: StageServer, transport: Any = None) -> None:
        from shoal.parallel.data.grpc_transport import GrpcTransport

        self.server = server
        self.transport = transport or GrpcTransport.for_runtime(server.runtime)
        self.averager = Averager(self.transport)
        self.rounds_ok = 0
        self.rounds_failed = 0

    async def loop(self) -> None:
        period = self.server.config.average_period_s
        while True:
            now = self.server.wall_clock()
            epoch = math.floor(now / period) + 1
            await asyncio.sleep(max(0.0, epoch * period - now))
            try:
                await self.average_once(epoch)
            except Exception as exc:  # a failed round must not end the loop
                self.rounds_failed += 1
                log.warning("stage averaging round %d failed: %s", epoch, exc)

    async def average_once(self, epoch: int) -> bool | None:
        """One round for period ``epoch``; None when alone on the stage, else success."""
        server = self.server
        core = server.core
        stage = core.stage
        members = await server.read(stage)
        me = server.runtime.peer_id.raw
        peers = {c.peer: c.address for c in members}
        peers[me] = server.runtime.address
        if len(peers) < 2:
            return None
        order = sorted(peers)
        for raw in order:
            if raw != me:
                self.transport.set_address(PeerID(raw), peers[raw])
        group = GroupSpec.uniform(
            round_id(server.config.prefix, stage, epoch), [PeerID(raw) for raw in order]
        )
        self.averager.prepare(group)
        before = await core.worker.submit(CONTROL, core.params_job)
        values = [t.clone() for t in before]
        result = await self.averager.average(
            values, 1.0, group=group, timeout_s=server.config.average_timeout_s
        )
        if not result.ok or core.stage != stage:
            self.rounds_failed += 1
            return False
        await core.worker.submit(CONTROL, lambda: core.add_delta_job(before, values))
        self.rounds_ok += 1
        return True
