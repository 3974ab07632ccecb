"""The stage of a round across groups: what a column member may bring, and what a
column's result must hold to count (see ``SwarmRounds`` in ``swarm_round.py``).

A round of more ready peers than one group holds averages in each group, then in
columns of members of every group (``matchmaking.cross_groups``). Each member brings its
group's mean tagged with its group's contributors; the rules here keep one group from
standing in for another, a group from counting twice, and a column from counting when
it lacks a group (it would hold another model than the other columns).
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.net.identity import PeerID
from shoal.parallel.data.averager import GroupSpec
from shoal.parallel.data.matchmaking import Group, members_tag, round_order, tag_members
from shoal.parallel.data.round import RoundResult

__all__ = ["Across", "ColumnTags", "column_verdict", "follow_up"]


class ColumnTags:
    """What a member of a column may bring under a tag (see :meth:`refused`)."""

    def __init__(self, groups: tuple[Group, ...], *, counted: bool) -> None:
        self.order = round_order(groups)
        self.group_of = {p.peer: k for k, g in enumerate(groups) for p in g.members}
        self.sizes = [len(g.members) for g in groups]
        self.counted = counted
        """Weights are contributor counts (robust rules): a tag's weight is its size."""

    def refused(self, sender: object, tag: bytes, weight: float | None = None) -> str | None:
        """Why ``sender`` may not bring ``tag`` (with ``weight``) into a column, or None.

        A tag must be the bitmap (exactly as ``members_tag`` writes it) of more than half
        of the sender's own group: another group's tag would put the sender's values in
        that group's place, a second spelling of one set would count a group twice, and
        a group that confirmed as two halves (each agreed by its own members) would bring
        two means, each taken for the group's in the columns it reached, where one set of
        contributors can be a majority. With ``counted``, the weight is the tag's size,
        not a claim (a robust round trusts no claimed weight)."""
        if not isinstance(sender, PeerID) or sender.raw not in self.group_of:
            return "not a member of the round's groups"
        marked = tag_members(self.order, tag)
        if not marked or tag != members_tag(self.order, marked):
            return "a malformed tag for a contribution across groups"
        group = self.group_of[sender.raw]
        if any(self.group_of[peer] != group for peer in marked):
            return "a tag that marks peers of another group"
        if 2 * len(marked) <= self.sizes[group]:
            return f"a tag for {len(marked)} of its group's {self.sizes[group]} members"
        if self.counted and weight is not None and weight != len(marked):
            return f"weight {weight!r} for a tag of {len(marked)} contributors"
        return None


@dataclass(frozen=True, slots=True)
class Across:
    """This peer's seat in the stage of a round across groups."""

    column: GroupSpec
    groups: tuple[Group, ...]
    """Every group of the round (the positions a contributors' tag marks)."""


def column_verdict(rules: ColumnTags, result: RoundResult) -> tuple[str, set[bytes]]:
    """Why a column's successful all-reduce does not count (empty: it does), and the
    peers its result stands for: every group of the round must be in it, under one tag
    each."""
    groups = len(rules.sizes)
    by_group: dict[int, set[bytes]] = {}  # each group's tags: one, in an honest round
    for member in result.contributors:
        tagged = result.tags.get(member, b"")
        if isinstance(member, PeerID) and not rules.refused(member, tagged):
            by_group.setdefault(rules.group_of[member.raw], set()).add(tagged)
    if len(by_group) < groups:
        return f"{groups - len(by_group)} of {groups} groups missing from this peer's column", set()
    if any(len(tags) > 1 for tags in by_group.values()):
        return "a group's members brought different contributor sets to the column", set()
    return "", set().union(*(tag_members(rules.order, t) for ts in by_group.values() for t in ts))


def follow_up(across: Across, result: RoundResult, represented: set[bytes]) -> Across:
    """The column of a follow-up exchange (``SwarmRounds.again``): the members whose own
    values are in the mean (a member its group left out takes no part)."""
    column = across.column
    kept = [
        i
        for i, m in enumerate(column.members)
        if m in result.contributors and isinstance(m, PeerID) and m.raw in represented
    ]
    return Across(column.subgroup(kept, column.round_id), across.groups)
