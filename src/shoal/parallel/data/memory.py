"""In-process network for the all-reduce, with deterministic fault injection.

Each member gets a :class:`MemoryTransport` whose ``send`` puts the message (tensors
cloned, as if serialised) straight into the receiver's inbox. A :class:`Fault` kills a
member at an exact point: when it is about to send its ``after``-th (0-based) message of a
given kind. From then on its sends raise :class:`PeerKilled` (which ends its round task,
like a SIGKILL would) and sends to it raise :class:`~shoal.errors.PeerUnavailable`. A
fault with ``stop`` instead cancels the member's round task at that point, as a peer that
is shutting down does: the member stays reachable and may still say that it leaves.
``fired`` records which faults really happened, so tests can assert on them.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass, replace

import torch

from shoal.compress import Encoded
from shoal.errors import PeerTimeout, PeerUnavailable
from shoal.net.aio import within
from shoal.parallel.data.messages import Contribution, Member, Message, Reduced
from shoal.parallel.data.transport import Inbox

__all__ = ["Fault", "MemoryNetwork", "MemoryTransport", "PeerKilled"]


class PeerKilled(Exception):
    """Raised inside a member that a fault killed (never caught by the protocol)."""


@dataclass(frozen=True, slots=True)
class Fault:
    """Kill ``peer`` just before it sends its ``after``-th message of type ``kind``."""

    peer: Member
    kind: str
    """``"Contribution"``, ``"Report"`` or ``"Reduced"``."""
    after: int = 0
    stop: bool = False
    """Cancel the member's round (a clean shutdown) instead of killing it."""


def _clone(data: object) -> object:
    if isinstance(data, torch.Tensor):
        return data.clone()
    if isinstance(data, Encoded):
        return replace(data, payload=tuple(t.clone() for t in data.payload))
    return data


class MemoryNetwork:
    """All members of one process-local swarm."""

    def __init__(self, faults: Iterable[Fault] = ()) -> None:
        self.faults = list(faults)
        self.fired: list[Fault] = []
        self.dead: set[Member] = set()
        self.unreachable: set[Member] = set()
        """Members that send as usual but that no one can send to (a refused address, a
        NAT): sends to them raise :class:`~shoal.errors.PeerUnavailable`."""
        self.slow: dict[tuple[Member, int], float] = {}
        """``(sender, part)``: seconds its contribution for that part takes to arrive; the
        receiver sees it arriving meanwhile (a stream's first frame comes at once)."""
        self.sent: Counter[tuple[Member, str]] = Counter()
        self.inboxes: dict[Member, Inbox] = {}
        self.delivered = asyncio.Event()
        self.rounds: dict[Member, asyncio.Task[object]] = {}
        """Each member's task of its current round (a stop fault cancels it)."""
        self.stopping: set[Member] = set()
        """Members a stop fault hit: their sends under way are dropped, as cancelled sends
        would be, except the leave messages they send on their way out."""

    def transport(self, member: Member) -> MemoryTransport:
        inbox = self.inboxes.setdefault(member, Inbox())
        return MemoryTransport(self, member, inbox)

    def kill(self, member: Member) -> None:
        self.dead.add(member)

    async def _send(self, sender: Member, to: Member, message: Message) -> None:
        if sender in self.dead:
            raise PeerKilled(f"{sender!r} is dead")
        kind = type(message).__name__
        if sender in self.stopping and kind != "Leave":
            raise PeerTimeout(f"{sender!r} is stopping")
        for fault in self.faults:
            if (
                fault.peer == sender
                and fault.kind == kind
                and fault.after == self.sent[(sender, kind)]
                and fault not in self.fired
            ):
                self.fired.append(fault)
                if fault.stop:  # the message is not sent; the round task is told to stop
                    self.stopping.add(sender)
                    self.rounds[sender].cancel()
                    raise PeerTimeout(f"{sender!r} stopping before {kind} #{fault.after}")
                self.kill(sender)
                raise PeerKilled(f"{sender!r} killed before {kind} #{fault.after}")
        self.sent[(sender, kind)] += 1
        await asyncio.sleep(0)
        if to in self.dead or to not in self.inboxes:
            raise PeerUnavailable("member is gone", peer=repr(to))
        if to in self.unreachable and to != sender:
            raise PeerUnavailable("member cannot be reached", peer=repr(to))
        if isinstance(message, Contribution | Reduced):
            message = replace(message, data=_clone(message.data))  # type: ignore[arg-type]
        delay = self.slow.get((sender, message.part), 0.0)
        if delay and isinstance(message, Contribution):
            mark = (message.round_id, Contribution, sender, message.part)
            self.inboxes[to].receiving(*mark)
            try:
                await asyncio.sleep(delay)
            finally:
                self.inboxes[to].received(*mark)
        self.inboxes[to].deliver(message)
        self.delivered.set()


class MemoryTransport:
    """One member's view of a :class:`MemoryNetwork`."""

    def __init__(self, network: MemoryNetwork, me: Member, inbox: Inbox) -> None:
        self.network = network
        self.me = me
        self.inbox = inbox

    def begin(
        self, round_id: bytes, members: Sequence[Member], clients: Set[Member], deadline: float
    ) -> None:
        """Nothing to set up (every member's inbox is reachable in memory); the round's
        task is noted for stop faults."""
        task = asyncio.current_task()
        if task is not None:
            self.network.rounds[self.me] = task

    async def end(self, round_id: bytes) -> None:
        pass

    async def send(self, to: Member, message: Message, timeout_s: float) -> None:
        try:
            await within(self.network._send(self.me, to, message), max(timeout_s, 0.0))
        except TimeoutError:
            raise PeerTimeout("send timed out", peer=repr(to)) from None
