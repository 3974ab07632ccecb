"""The messages of one all-reduce round.

- :class:`Contribution`: a member's slice ``part`` of its vector, with its weight, sent to
  the part's reducer (or, in repair, to the survivor that took over a dead reducer's part).
- :class:`Report`: a reducer tells every member whose contributions to its part it
  received and accepted (and whom it rejected, with a reason).
- :class:`Reduced`: the combined ``part`` over exactly ``contributors`` (with their total
  weight and their tags), sent to every member (all-gather).
- :class:`Leave`: the sender stops mid-round (its peer is shutting down, or its caller gave
  up): the others stop waiting for it instead of sitting out a phase deadline. It is only
  a hint that ends waits early; what makes a result correct is unchanged (every part must
  carry the same contributor set).

``data`` is a raw fp32 tensor or an :class:`~shoal.compress.Encoded` value when a wire
codec is on. Members are identified by their id (``bytes`` in a swarm, anything hashable in
tests); the sender of a message is set by the transport, never trusted from the payload.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from shoal.compress import Encoded

__all__ = [
    "MAX_TAG_BYTES",
    "Contribution",
    "Leave",
    "Member",
    "Message",
    "Reduced",
    "Report",
    "WireTensor",
    "wire_numel",
]

Member = Hashable
MAX_TAG_BYTES = 64
"""Longest tag a contribution may carry (a bitmap of 512 peers)."""
WireTensor = torch.Tensor | Encoded


def wire_numel(data: WireTensor) -> int:
    """Values carried, encoded or not."""
    return data.numel if isinstance(data, Encoded) else data.numel()


@dataclass(frozen=True, slots=True)
class Contribution:
    round_id: bytes
    sender: Member
    part: int
    weight: float
    data: WireTensor
    tag: bytes = b""
    """What the vector stands for (empty: the sender's own). Contributions to one round
    under the same non-empty tag carry the same values (one group's mean, sent by each of
    its members in a round across groups) and count once, with one sender's weight."""


@dataclass(frozen=True, slots=True)
class Report:
    round_id: bytes
    sender: Member
    part: int
    accepted: frozenset[Member]
    rejected: dict[Member, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reduced:
    round_id: bytes
    sender: Member
    part: int
    contributors: frozenset[Member]
    weight: float
    """Sum of the contributors' weights (a tag's weight once)."""
    data: WireTensor
    tags: dict[Member, bytes] = field(default_factory=dict)
    """The tag of each contributor that sent one."""


@dataclass(frozen=True, slots=True)
class Leave:
    round_id: bytes
    sender: Member
    part: int
    """The sender's index in the group as the sender knows it (0 when it cannot know it:
    see ``send_leave``). Who leaves is the authenticated sender, whatever its index."""


Message = Contribution | Report | Reduced | Leave
