"""Which members a round's result is the mean of: the rules every member applies to the
reducers' reports, so that members holding the same reports agree (``allreduce.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Set

from shoal.parallel.data.messages import Member, Report

__all__ = ["agreed_contributors", "cut_off_reducers", "heard_from"]


def heard_from(report: Report, members: Sequence[Member]) -> int:
    """How many members a reducer heard from: every contribution that reached it, accepted
    or refused (its report names both)."""
    return len((report.accepted | report.rejected.keys()) & set(members))


def agreed_contributors(
    reports: dict[int, Report], members: Sequence[Member], dead: Iterable[int]
) -> frozenset:
    """The contributors every reducer still in the round accepted, less the reducers
    left out."""
    out = set(dead)
    common = frozenset(members)
    for j, r in reports.items():
        if j not in out:
            common &= r.accepted
    return common - {members[j] for j in out}


def cut_off_reducers(
    reports: dict[int, Report],
    members: Sequence[Member],
    silent: Sequence[int],
    gone: Set[Member] = frozenset(),
) -> dict[int, str]:
    """Reducers that heard from fewer than half as many members as the best-heard one,
    when leaving them out keeps more contributors; with the reason.

    Such a reducer is reachable by few (its address is refused, or it sits behind a NAT
    without saying so) while it reaches everyone: its report is the only one that lacks
    most contributions, and intersecting it would fail the round for every member. Its
    part is reassigned instead, like a dead reducer's, and every agreed contributor sends
    its raw slice of that part to the substitute. A reducer heard from everyone whose
    contribution reached it, used or not: refused by screening, unreadable, arrived late,
    or still arriving when it reported. So a reducer that refused garbage is never the one
    cut off, nor one whose senders are merely slow (they would be as slow to repair).
    Members that left (``gone``) send no repair, so they count for neither side, and a cut
    that would need one of them is not made. Apart from ``gone``, a function of the
    reports alone: members with the same reports agree (those without fail, as ever).
    """
    heard = {j: heard_from(r, members) for j, r in reports.items()}
    most = max(heard.values(), default=0)
    cut = {j for j, n in heard.items() if 2 * n < most}
    if not cut:
        return {}
    kept = agreed_contributors(reports, members, [*silent, *cut])
    if kept & gone or len(kept) <= len(agreed_contributors(reports, members, silent) - gone):
        return {}
    return {
        j: f"its reducer heard from {heard[j]} of {len(members)} members (cut off)" for j in cut
    }
