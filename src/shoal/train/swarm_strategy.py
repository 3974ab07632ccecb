"""What the swarm loop asks of a data-parallel strategy, and the helpers strategies share.

A strategy owns how one local step turns into (maybe) a round with the swarm:
:class:`Strategy.step` trains one local step and returns a :class:`StepOutcome`; the loop
snapshots the run after every applied round (``report.ok``) it reports. ``blocking_round`` runs a
round coroutine on the network loop from the compute thread, giving up at a deadline or
as soon as the peer is asked to stop (the round then counts as failed and nothing is
applied).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from shoal.net.runtime import NetRuntime
from shoal.train.diloco import RoundReport
from shoal.train.swarm_config import PeerOptions
from shoal.train.swarm_round import SwarmRounds
from shoal.train.swarm_round_config import RoundOutcome, RoundsConfig, wait_outcome
from shoal.train.swarm_services import PeerServices

__all__ = [
    "StepOutcome",
    "Strategy",
    "blocking_round",
    "outer_round_key",
    "record_round_time",
    "round_key",
    "rounds_config",
    "swarm_rounds",
]


@dataclass(frozen=True, slots=True)
class StepOutcome:
    loss: float
    samples: int
    reports: tuple[RoundReport, ...] = ()
    """Every round that ended in this step, in order (streaming may end two, one of them
    applied: each is reported, noted and snapshotted)."""

    @classmethod
    def of(cls, loss: float, samples: int, report: RoundReport | None) -> StepOutcome:
        """A step that ended at most one round."""
        return cls(loss, samples, () if report is None else (report,))


class Strategy(Protocol):
    mode: str

    @property
    def round_index(self) -> int: ...

    @property
    def applied_step(self) -> int:
        """Local step of the last applied round (swarm state must be fresher to be taken)."""
        ...

    @property
    def progress(self) -> list[int] | None:
        """Counts of applied rounds that compare across peers (streaming: one per
        fragment), announced with snapshots; None where steps are the measure."""
        ...

    @property
    def progress_tag(self) -> str | None:
        """Names the state :attr:`progress` reached (announced with it): peers with equal
        counts and different tags diverged (or one holds a state from before the tag named
        its round's contributors), and the one of the greater tag takes the other's state."""
        ...

    def step(self) -> StepOutcome: ...

    def fingerprint(self) -> str: ...

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def state_misfit(self, tensors: dict[str, torch.Tensor]) -> str | None:
        """Why :meth:`load_state` would refuse a snapshot's strategy ``tensors`` (None: it
        takes them); checked before anything of the snapshot is restored."""
        ...

    def load_state(
        self, tensors: dict[str, torch.Tensor], round_index: int, applied_step: int
    ) -> bool:
        """Adopt restored state; False, with nothing changed, when it does not fit."""
        ...

    def start_from_outer(self) -> None:
        """Set the model to the adopted outer parameters (after a restore from a donor's
        snapshot: its model holds the donor's local progress, which the donor sends
        itself; starting from it would send it twice)."""
        ...

    def close(self) -> None: ...


def round_key(mode: str, index: int, tag: object = None) -> bytes:
    """The rendezvous key every peer derives alike for round ``index``.

    ``tag`` narrows it further (a fragment number, a fingerprint of the outer parameters):
    only peers that agree on it average together.
    """
    tail = f"/{tag}" if tag is not None else ""
    return f"{mode}/{index}{tail}".encode()


def outer_round_key(mode: str, tag: str) -> bytes:
    """The rendezvous key of a DiLoCo round: the outer parameters' fingerprint (``tag``),
    not a count of rounds. Peers holding the same outer state meet whatever rounds each
    counted: a peer restarted from its checkpoint has counted fewer than one that kept
    failing alone meanwhile, and with the count in the key they never met again. Attempts
    under one key are told apart by matchmaking's nonces and retry keys."""
    return f"{mode}/outer/{tag}".encode()


def blocking_round(
    runtime: NetRuntime,
    coro: Coroutine[Any, Any, RoundOutcome],
    *,
    stop: threading.Event,
    timeout_s: float,
) -> RoundOutcome:
    """Run ``coro`` on the loop and wait for it from the compute thread (see module doc)."""
    return wait_outcome(runtime.submit(coro), stop=stop, timeout_s=timeout_s)


def rounds_config(opts: PeerOptions) -> RoundsConfig:
    """How a peer's rounds form and how long they may take, from its options."""
    return RoundsConfig(
        wire_codec=opts.wire_codec,
        aggregation=opts.aggregation,
        window_initial_s=opts.window_s,
        window_cap_s=max(opts.window_s, 60.0),
        allreduce_timeout_s=opts.allreduce_timeout_s,
        max_group_size=opts.max_group_size,
        client_mode=opts.client_mode,
    )


def swarm_rounds(services: PeerServices, opts: PeerOptions) -> SwarmRounds:
    """A strategy's rounds: rendezvous on this swarm's board, settings from ``opts``."""
    return SwarmRounds(
        services.runtime,
        services.dht.node,
        swarm=opts.swarm,
        config=rounds_config(opts),
        own_address=services.round_address,
        dial_address=services.dial_address,
    )


async def swarm_average(
    services: PeerServices, rounds: SwarmRounds, vector: torch.Tensor, weight: float, key: bytes
) -> RoundOutcome:
    """One round under ``key`` (within this peer's round scope), expecting the peers a
    freshly read membership view says can average with this one.

    With none, the round fails at once and says why: a peer alone used to wait out a
    whole matchmaking window every round, and peers set apart by a setting (codec, model
    width) each reported only that no other peer was ready.
    """
    view = await services.fresh_view()
    if view.compatible <= 1:
        rounds.skipped()
        return RoundOutcome(False, reason=view.alone_reason(), skipped=True)
    # The board's keys travel in every matchmaking call: the scope goes in as a short hash.
    scope_tag = hashlib.blake2b(services.scope.encode(), digest_size=6).hexdigest()
    scoped = scope_tag.encode() + b"/" + key
    outcome = await rounds.average(vector, weight, round_key=scoped, expected_peers=view.compatible)
    outcome.expected = view.compatible
    if not outcome.ok and not outcome.group_size and view.other_scopes:
        outcome.reason += f" ({view.alone_reason().partition('; ')[2]})"
    return outcome


def record_round_time(services: PeerServices, outcome: RoundOutcome) -> None:
    """Matchmaking counts as waiting, the all-reduce as communication (step profiler)."""
    prof = services.monitor.profiler
    prof.add("waiting", outcome.seconds.get("matchmaking", 0.0))
    prof.add("communication", outcome.seconds.get("allreduce", 0.0))
