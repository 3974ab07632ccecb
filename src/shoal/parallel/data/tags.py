"""Tagged contributions: several members carrying one mean into a round, counted once.

In the columns of a round across groups (``shoal.train.swarm_round``) every member brings
its group's mean, tagged with its group's contributors (``Contribution.tag``). A reducer
refuses tags its caller's ``check_tag`` refuses, checks that contributions under one tag
are twins (equal values and weights), and counts each tag once, in the tags' order, so
that every column, with other members and other parts, sums the same terms in the same
order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from shoal.parallel.data.messages import Contribution, Member

__all__ = ["counted_senders", "screen_tags", "unlike_twins"]


def screen_tags(
    contributions: Sequence[Contribution],
    accepted: set[Member],
    rejected: dict[Member, str],
    check_tag: Callable[[Member, bytes, float], str | None] | None,
) -> None:
    """Move the accepted senders whose tag ``check_tag`` refuses to ``rejected``."""
    if check_tag is None:
        return
    for m in contributions:
        if m.sender in accepted:
            why = check_tag(m.sender, m.tag, m.weight)
            if why is not None:
                accepted.discard(m.sender)
                rejected[m.sender] = why


def unlike_twins(
    counted: Sequence[Member],
    tags: dict[Member, bytes],
    have: dict[Member, tuple[float, torch.Tensor]],
) -> str:
    """The senders whose values differ from those of the counted sender of their tag
    (empty when none do): they must be the same mean."""
    first = {tags[m]: m for m in counted if m in tags}
    unlike = [
        m
        for m, tag in tags.items()
        if first[tag] != m
        and (have[m][0] != have[first[tag]][0] or not torch.equal(have[m][1], have[first[tag]][1]))
    ]
    return ", ".join(str(m)[:12] for m in unlike)


def counted_senders(order: Sequence[Member], tags: dict[Member, bytes]) -> list[Member]:
    """The first sender in ``order`` of each tag, in the order of the tags, then the
    untagged senders in ``order``.

    Several rounds (one per column of a round across groups) reduce the same tagged means
    with different members: summed in the tags' order, with each product rounded on its
    own (``fused=False``), every one of them computes the same bits.
    """
    first: dict[bytes, Member] = {}
    for m in order:
        tag = tags.get(m, b"")
        if tag and tag not in first:
            first[tag] = m
    untagged = [m for m in order if not tags.get(m)]
    return [first[tag] for tag in sorted(first)] + untagged
