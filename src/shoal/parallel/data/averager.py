"""``Averager``: the API the training loop calls to average tensors with a group.

    result = await averager.average(tensors, weight=samples, group=group, timeout_s=30)
    if result.ok:  # tensors now hold the weighted mean over result.contributors
        ...

On failure the tensors are untouched and ``result.reason`` says why. A group is the
ordered member list with each member's measured links and client mode (from matchmaking)
and a round id every member derived alike; the shares follow the links
(:func:`~shoal.parallel.data.partition.plan_shares`). Must be awaited on the network loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from shoal.compress.registry import codec_by_name
from shoal.errors import ConfigError
from shoal.parallel.data.allreduce import AllReduceConfig, RoundResult, run_allreduce
from shoal.parallel.data.buffers import BufferPool
from shoal.parallel.data.messages import Member
from shoal.parallel.data.partition import FlatVector, part_ranges, plan_shares
from shoal.parallel.data.sending import send_leave
from shoal.parallel.data.transport import RoundTransport

__all__ = ["Averager", "GroupSpec"]


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """Who averages in one round and how the vector is split among them."""

    round_id: bytes
    members: tuple[Member, ...]
    uplinks_bps: tuple[float, ...]
    client_mode: tuple[bool, ...]
    downlinks_bps: tuple[float, ...] = ()
    """Empty: every downlink as its uplink; a 0 entry: that one not measured."""

    def __post_init__(self) -> None:
        n = len(self.members)
        if n == 0 or len(set(self.members)) != n:
            raise ConfigError(f"members must be non-empty and unique, got {self.members!r}")
        if len(self.uplinks_bps) != n or len(self.client_mode) != n:
            raise ConfigError("members, uplinks_bps and client_mode differ in length")
        if self.downlinks_bps and len(self.downlinks_bps) != n:
            raise ConfigError("members and downlinks_bps differ in length")

    def shares(self) -> list[float]:
        """The fraction of the vector each member reduces."""
        return plan_shares(self.uplinks_bps, self.downlinks_bps or None, self.client_mode)

    def subgroup(self, keep: Sequence[int], round_id: bytes) -> GroupSpec:
        """The members at the indices ``keep``, with their links, under ``round_id``."""
        return GroupSpec(
            round_id,
            tuple(self.members[i] for i in keep),
            tuple(self.uplinks_bps[i] for i in keep),
            tuple(self.client_mode[i] for i in keep),
            tuple(self.downlinks_bps[i] for i in keep) if self.downlinks_bps else (),
        )

    @classmethod
    def uniform(cls, round_id: bytes, members: Sequence[Member]) -> GroupSpec:
        """Equal shares, nobody in client mode."""
        n = len(members)
        return cls(round_id, tuple(members), (1.0,) * n, (False,) * n)


class Averager:
    """Averages tensors with a group over a :class:`RoundTransport`."""

    def __init__(
        self,
        transport: RoundTransport,
        *,
        wire_codec: str = "none",
        config: AllReduceConfig | None = None,
    ) -> None:
        self.transport = transport
        self.codec = codec_by_name(wire_codec)
        self.config = config or AllReduceConfig()
        self.buffers = BufferPool()

    def prepare(self, group: GroupSpec, numel: int | None = None, *, tagged: bool = False) -> None:
        """Start holding messages for ``group``'s round (call as soon as the group is known).

        With ``numel`` (the vector's length, and whether it will be averaged under a tag) the
        part sizes are known at once: what a member sends before the round starts here is
        bounded by them (a round opened without sizes bounds nothing until it starts)."""
        sizes = None
        if numel is not None:
            sizes = [b - a for a, b in self._ranges(numel, group.shares(), tagged)]
        self.transport.inbox.open(group.round_id, group.members, sizes)

    def _ranges(self, numel: int, shares: Sequence[float], tagged: bool) -> list[tuple[int, int]]:
        # A tagged round is one of several (the columns of a round across groups) that
        # must give the same bits: blockwise codecs then cut every part alike.
        align = getattr(self.codec, "block_size", 1) if tagged else 1
        return part_ranges(numel, shares, align)

    async def average(
        self,
        tensors: Sequence[torch.Tensor],
        weight: float,
        *,
        group: GroupSpec,
        timeout_s: float,
        tag: bytes = b"",
        check_tag: Callable[[Member, bytes, float], str | None] | None = None,
    ) -> RoundResult:
        """Average ``tensors`` in place with ``group``; see the module docstring. Members
        sending the same non-empty ``tag`` count once (see ``Contribution.tag``), and
        reducers refuse a contribution whose tag ``check_tag`` refuses (``run_allreduce``)."""
        if self.transport.me not in group.members:
            raise ConfigError(f"this peer {self.transport.me!r} is not in the group")
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s!r}")
        flat = FlatVector(tensors)
        deadline = asyncio.get_running_loop().time() + timeout_s
        clients = {m for m, c in zip(group.members, group.client_mode, strict=True) if c}
        self.transport.begin(group.round_id, group.members, clients, deadline)
        try:
            try:  # planning takes milliseconds (a quarter second for 256 members): off the loop
                shares = await asyncio.to_thread(group.shares)
            except asyncio.CancelledError:  # the others may count on us already: say we leave
                try:
                    await send_leave(self.transport, group.round_id, group.members)
                finally:
                    self.transport.inbox.close(group.round_id)
                raise
            ranges = self._ranges(flat.numel, shares, bool(tag))
            screened: dict[Member, str] = {}
            result, parts = await run_allreduce(
                self.transport,
                group.round_id,
                group.members,
                ranges,
                flat.flat,
                weight,
                deadline,
                codec=self.codec,
                config=self.config,
                buffers=self.buffers,
                screened=screened,
                tag=tag,
                check_tag=check_tag,
            )
            result = replace(result, screened=screened)
        finally:
            await self.transport.end(group.round_id)
        if result.ok and parts is not None:
            await asyncio.to_thread(flat.write_parts, ranges, parts)
        return result
