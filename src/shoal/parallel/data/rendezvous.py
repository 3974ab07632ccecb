"""The async loop that forms a group on a rendezvous board (``board.py``).

``find_group`` announces this peer, polls the board until the window closes (everyone
expected is ready, or the window from :class:`FormationEstimator` ran out), then derives
the groups with :func:`form_groups` from what it saw. "Everyone expected" is this peer's
count of live trainers, or the median of the counts on the entries read when that is
more: a peer with a lagging membership view waits for the peers the others see, and one
entry claiming a huge count cannot hold every window open.

A peer whose window runs out (someone expected never came) posts its entry once more,
marked closed, before it confirms; peers still inside their windows close them at their
next read. Windows are learned per peer and open at each peer's own arrival, so without
this a pair waiting for a third peer that was elsewhere closed seconds apart, and the
later closer confirmed after the earlier one had given up on it.

Peers close their windows at different moments, so two members can see different boards
(a late arrival seen by one and not the other) and derive different groups, which would
send them into different all-reduce sessions and fail the round for both. So a second
phase confirms the group: each peer posts the id of the group it derived, waits (bounded)
until every member it expects has posted one, and keeps only the members that derived the
*same* group. Everyone who derived group G keeps the same subset of G, so the confirmed
group (whose id is derived from the subset) is identical at all its members, except when a
confirmation reached one member and not another before the deadline; then the round fails
for those two, quickly, instead of costing a whole all-reduce timeout. A peer whose
confirmation failed withdraws it, so a member whose window closes later does not pick it.
A peer that leaves before confirming (it closed its window alone, or it is stopping) posts
a withdrawal too, which the others count as its answer: they go on without it at their
next read instead of waiting out the confirmation timeout. Its entry outlives it on the
board, so a window about to close early reads the withdrawals first, and closes only with
another peer there that stayed: a peer that had just given up otherwise closed the next
arrival's window at once, failed its confirmation, and that arrival's withdrawal did the
same to the first one's next try.

A restarted peer meets under the key its earlier run was last announced on, with the same
subkey, and the DHT keeps the earlier run's records (they expire later). When a read shows
such an entry or confirmation of ours, it is posted once more (the board then writes past
what it read); peers that already read the earlier entry may still fail that attempt.

A key can be met under more than once (sync mode retries a step whose round found no
group). Each attempt announces a random nonce; group ids hash the members' nonces and
confirmations start with the poster's, so entries, confirmations and withdrawals of an
earlier attempt never count as agreement. Polls are bounded in count and time, and so is
every board call (``board_timeout_s``; ``MatchConfig.overrun_s`` is the most matchmaking
can take beyond its window).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from shoal.errors import ConfigError
from shoal.parallel.data.board import (
    RendezvousBoard,
    Withdrawals,
    bounded,
    withdraw,
)
from shoal.parallel.data.matchmaking import (
    NONCE_BYTES,
    FormationEstimator,
    Group,
    ReadyPeer,
    form_groups,
    window_closed,
)

__all__ = ["MatchConfig", "NoGroup", "find_group"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NoGroup:
    """Why this peer has no group for the round (it skips it)."""

    reason: str
    round_groups: tuple[Group, ...] = field(default=(), compare=False)
    """The round's groups, when it derived several and its own did not confirm it: the
    others may count on it in the stage across groups (``Group.round_groups``)."""


def _why_no_group(
    ready: list[ReadyPeer], me: ReadyPeer, min_group_size: int, max_group_size: int
) -> NoGroup:
    others = sum(1 for p in ready if p.peer != me.peer)
    if others == 0:
        return NoGroup("no group formed: no other peer was ready for this round")
    if all(p.client_mode for p in ready):
        return NoGroup(
            f"no group formed: all {others + 1} ready peers are in client mode (none accepts "
            "connections, e.g. all behind NATs); a group needs one peer that can be dialed"
        )
    servers = sum(1 for p in ready if not p.client_mode)
    if me.client_mode and len(ready) > servers * max_group_size:
        return NoGroup(
            f"no group formed: {len(ready)} peers were ready and only {servers} accept "
            f"connections, which seats at most {servers * max_group_size} in groups of "
            f"{max_group_size}; this client waits for a later round"
        )
    return NoGroup(
        f"no group formed: this peer's share of the {others + 1} ready peers fell below "
        f"{min_group_size} or had no peer that accepts connections"
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class MatchConfig:
    """Group formation settings."""

    max_group_size: int = 16
    """Largest all-reduce group."""
    min_group_size: int = 2
    """Smaller groups skip the round."""
    poll_interval_s: float = 0.1
    """How often the board is read while the window is open."""
    max_polls: int = 10_000
    """Hard bound on board reads per window (and per confirmation phase)."""
    max_board_entries: int = 256
    """Most entries one board read can show (the DHT answers at most
    ``RecordLimits.max_records_per_message`` records of a key). A window closes early once
    the peers expected are ready, up to this many, not up to ``max_group_size``: with more
    peers ready than one group holds, a window closing at ``max_group_size`` closed on
    whichever peers each reader had seen, and readers formed groups that did not match."""
    confirm_timeout_s: float = 5.0
    """Longest wait for the members' confirmations after the window closed; members that
    have not confirmed by then are left out of the round."""
    board_timeout_s: float = 2.5
    """Longest wait for one board write, or for a read past the end of its phase (a slow
    lookup must not stretch matchmaking past the round's deadline)."""

    @property
    def overrun_s(self) -> float:
        """Longest :func:`find_group` can take beyond its window: the own announcement, its
        one re-post over an earlier run's and the read after it, the last read, the look
        for withdrawals after it, the closed mark, the own confirmation and its one
        re-post, the confirmation phase and its last read (a withdrawal when no group
        formed adds one more write, but no round follows)."""
        return 8 * self.board_timeout_s + self.confirm_timeout_s + self.poll_interval_s

    def __post_init__(self) -> None:
        if not 1 <= self.min_group_size <= self.max_group_size:
            raise ConfigError(
                f"need 1 <= min_group_size <= max_group_size, got "
                f"{self.min_group_size!r}, {self.max_group_size!r}"
            )
        if not self.poll_interval_s > 0:
            raise ConfigError(f"poll_interval_s must be > 0, got {self.poll_interval_s!r}")
        if self.max_polls < 1:
            raise ConfigError(f"max_polls must be >= 1, got {self.max_polls!r}")
        if self.max_board_entries < self.max_group_size:
            raise ConfigError(
                f"max_board_entries ({self.max_board_entries!r}) must be >= max_group_size "
                f"({self.max_group_size!r})"
            )
        if not self.confirm_timeout_s > 0:
            raise ConfigError(f"confirm_timeout_s must be > 0, got {self.confirm_timeout_s!r}")
        if not self.board_timeout_s > 0:
            raise ConfigError(f"board_timeout_s must be > 0, got {self.board_timeout_s!r}")


async def find_group(
    board: RendezvousBoard,
    round_key: bytes,
    me: ReadyPeer,
    *,
    expected_peers: int,
    estimator: FormationEstimator,
    config: MatchConfig,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    on_confirm: Callable[[Group], None] | None = None,
    min_window_s: float = 0.0,
) -> Group | NoGroup:
    """Announce, wait for the window to close, and return this peer's group (or why not).

    The window is ``estimator``'s, but at least ``min_window_s`` (within its cap).

    ``on_confirm(group)`` is called just before this peer confirms ``group``: from then on
    the others may start its all-reduce counting on this peer, so a caller that gives up
    (is cancelled) should tell them it leaves.

    Each attempt announces a fresh nonce, and group ids hash the members' nonces: a retry
    under the same key (sync mode asks again for a step whose round found no group) never
    mistakes the last attempt's confirmations, or a departed peer's entry, for agreement.
    """
    opened_at = clock()
    window_s = estimator.window_s(at_least_s=min_window_s)
    # The entry lives until the next window would close (a slow closer still sees it), and
    # a withdrawal must outlive the entry it answers for.
    entry_expires_at = opened_at + 2 * window_s + 1.0
    me = replace(me, expected=expected_peers, nonce=os.urandom(NONCE_BYTES))
    confirming: list[Group] = []  # from then on, the caller's leave speaks for us

    def confirm_hook(group: Group) -> None:
        confirming.append(group)
        if on_confirm is not None:
            on_confirm(group)

    try:
        found = await _find_group(
            board,
            round_key,
            me,
            opened_at=opened_at,
            window_s=window_s,
            expires_at=entry_expires_at,
            estimator=estimator,
            config=config,
            clock=clock,
            sleep=sleep,
            on_confirm=confirm_hook,
        )
    except asyncio.CancelledError:
        # Gone before confirming: post a withdrawal, so members that put us in their group
        # count us out at their next read instead of after the whole confirmation timeout.
        # Not once confirming: members that read our confirmation already count us in, and
        # those reading a withdrawal after them would not, which splits the group (all
        # counting us in meet, and go on without us once the caller's leave or the collect
        # deadline says we left).
        if not confirming:
            with contextlib.suppress(Exception):  # best effort: the cancellation goes on
                await withdraw(
                    board,
                    round_key,
                    me,
                    max(entry_expires_at, clock() + 60.0),
                    config.board_timeout_s,
                )
        raise
    if isinstance(found, NoGroup) and not confirming:
        # Leaving without a group (e.g. alone when the window closed): a peer that arrives
        # later still sees our entry, and must not wait for our confirmation.
        with contextlib.suppress(Exception):  # best effort: the reason stays the real one
            await withdraw(
                board, round_key, me, max(entry_expires_at, clock() + 60.0), config.board_timeout_s
            )
    return found


async def _find_group(
    board: RendezvousBoard,
    round_key: bytes,
    me: ReadyPeer,
    *,
    opened_at: float,
    window_s: float,
    expires_at: float,
    estimator: FormationEstimator,
    config: MatchConfig,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[None]],
    on_confirm: Callable[[Group], None],
) -> Group | NoGroup:
    closes_at = opened_at + window_s
    await bounded(board.announce(round_key, me, expires_at=expires_at), config.board_timeout_s)
    ready: list[ReadyPeer] = []
    reads = expect = 0
    reannounced = filled = False
    withdrawals = Withdrawals(board, round_key, me, config.board_timeout_s)
    # Entries seen open in this attempt: only their closed marks count. A closed entry of
    # an earlier attempt under the same key (a retry, or a fragment's key met again) would
    # close this window at once on a nonce nobody answers to any more.
    seen_open: set[tuple[bytes, bytes]] = set()
    for _ in range(config.max_polls):
        read_s = max(closes_at - clock(), 0.0) + config.board_timeout_s
        read = await bounded(board.entries(round_key), read_s)
        if read is not None:  # a late read keeps the last one
            ready, reads = read, reads + 1
            seen_open.update((p.peer, p.nonce) for p in ready if not p.closed)
            if not reannounced and _stale(ready, me):
                # The board kept an earlier announcement of ours (a run of this peer
                # before a restart): announce once more, past what the board holds.
                reannounced = True
                announce = board.announce(round_key, me, expires_at=expires_at)
                await bounded(announce, config.board_timeout_s)
                continue  # and read again before the window may close on the stale read
        now = clock()
        expect = _expected_count(ready, me, config)
        if window_closed(
            now=now,
            opened_at=opened_at,
            window_s=window_s,
            n_ready=len(ready),
            expected_peers=expect,
        ) or _closed_by_another(ready, me, seen_open):
            # Entries outlive their attempts: a peer that gave up moments ago closed the
            # next arrival's window at once, that one's confirmation failed, and its own
            # withdrawn entry did the same to the first one's next try, every time. So a
            # window closes early only with someone there to meet. (Withdrawn entries
            # still count, and go into the groups: every reader must derive the same
            # groups, whether it read a withdrawal yet or not; a withdrawal is an answer
            # to the confirmation, and the members that stayed go on without it.)
            need = max(1, config.min_group_size - 1)
            if now >= closes_at:
                break
            if await withdrawals.others_staying(ready) >= need:
                filled = len(ready) >= expect  # not closed by another's mark
                break
        wait = min(_poll_interval(config, len(ready)), opened_at + window_s - now)
        await sleep(max(0.0, wait))
    if reads == 0:  # a slow DHT, not an empty swarm: say so, and learn nothing from it
        return NoGroup(
            f"no group formed: no read of the board finished within the window "
            f"({window_s:.3g} s) plus {config.board_timeout_s:g} s"
        )
    if filled:
        # Only a window that filled says how long filling takes. One that ran out (or was
        # closed by a peer whose window ran out, or held only withdrawn entries besides
        # ours when the count was reached) says only "longer than this": observed,
        # each one grew the next by its deviation, and while a dead or partitioned peer
        # stayed in the views the windows climbed towards the cap (a swarm healed from a
        # partition then sat 36 s in one window before its halves met again).
        estimator.observe(clock() - opened_at)
    if len(ready) >= config.max_board_entries:
        _log.warning(
            "%d peers ready under one round key, as many as a board read shows: readers may "
            "see different peers and form groups that do not match",
            len(ready),
        )
    if _stale(ready, me):
        # The board kept our earlier announcement (the store was refused): every group id
        # the others derive holds its nonce, and our confirmation could never match.
        return NoGroup("no group formed: the board kept this peer's earlier announcement")
    groups = form_groups(
        round_key,
        ready,
        max_group_size=config.max_group_size,
        min_group_size=config.min_group_size,
    )
    mine = next((g for g in groups if any(p.peer == me.peer for p in g.members)), None)
    if mine is None:
        return _why_no_group(ready, me, config.min_group_size, config.max_group_size)
    if len(ready) < expect and not _closed_by_another(ready, me, seen_open):
        # Our window ran out: say so, and members still waiting close theirs now rather
        # than seconds later, when our confirmation phase may be over. Not when it closed
        # on as many as we expected while others expect more (a lagging view, capped at
        # one group): a mark then closed their windows on boards of every size between,
        # and 80 ready peers formed 14 groups instead of two; alone, we lose only our seat.
        closed = board.announce(round_key, replace(me, closed=True), expires_at=expires_at)
        await bounded(closed, config.board_timeout_s)
    on_confirm(mine)
    found = await _confirm(board, round_key, me, mine, config=config, clock=clock, sleep=sleep)
    if len(groups) > 1:  # the round goes on across the groups
        found = replace(found, round_groups=tuple(groups))
    return found


def _expected_count(ready: list[ReadyPeer], me: ReadyPeer, config: MatchConfig) -> int:
    """How many ready peers to wait for: the own count, or the median of everyone's
    (upper, the own included once) when that is more, at most what a board read shows.

    Others' counts serve a peer whose membership view lags: it waits for the peers the
    others see, and meets them, instead of closing on a part of the board that no one
    else cuts into groups. The median, not the largest: one entry claiming 65,536 peers
    held every window open to its end, round after round (windows that run out teach the
    estimator nothing); a few peers' counts move it only when they are most of them.
    """
    claims = sorted([me.expected, *(p.expected for p in ready if p.peer != me.peer and p.expected)])
    median = claims[len(claims) // 2]
    return min(config.max_board_entries, max(me.expected, median))


def _closed_by_another(
    ready: list[ReadyPeer], me: ReadyPeer, seen_open: set[tuple[bytes, bytes]]
) -> bool:
    """Whether another peer, seen open in this attempt, says its window ran out."""
    return any(p.closed and p.peer != me.peer and (p.peer, p.nonce) in seen_open for p in ready)


def _stale(ready: list[ReadyPeer], me: ReadyPeer) -> bool:
    """Whether the board shows an announcement of ours other than this attempt's."""
    return any(p.peer == me.peer and p.nonce != me.nonce for p in ready)


_ENTRIES_PER_POLL = 32


def _poll_interval(config: MatchConfig, entries: int) -> float:
    """How long to wait before reading a board that showed ``entries`` records again.

    Every ready peer polls the same key, so at a fixed pace the bytes read grow with the
    square of the peers: 256 peers reading 256 entries (about 300 bytes each) 4 times a
    second would pull 79 MB/s off the few nodes holding the key. Past 32 entries the pace
    slows in proportion, which keeps that linear in the peers (10 MB/s at 256); a large
    round closes a little later instead.
    """
    return config.poll_interval_s * max(1.0, entries / _ENTRIES_PER_POLL)


async def _confirm(
    board: RendezvousBoard,
    round_key: bytes,
    me: ReadyPeer,
    group: Group,
    *,
    config: MatchConfig,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[None]],
) -> Group | NoGroup:
    """Keep the members of ``group`` that derived the same group (see the module docstring)."""
    expires_at = clock() + config.board_timeout_s + config.confirm_timeout_s + 60.0
    # A post is the poster's attempt nonce, then the group id it derived: posts of an
    # earlier attempt under the same key (or their withdrawals) do not count as answers.
    nonces = {p.peer: p.nonce for p in group.members}
    await bounded(
        board.confirm(round_key, me.peer, me.nonce + group.group_id, expires_at=expires_at),
        config.board_timeout_s,
    )
    deadline = clock() + config.confirm_timeout_s  # counted from our own post
    want = set(nonces) - {me.peer}  # our own post may lag in reads
    seen: dict[bytes, bytes] = {}
    stale = reposted = False
    posts = 0
    for _ in range(config.max_polls):
        read = await bounded(
            board.confirmations(round_key), max(deadline - clock(), config.poll_interval_s)
        )
        if read is not None:
            posts = len(read)
            own_post = read.get(me.peer)
            stale = own_post is not None and not own_post.startswith(me.nonce)
            seen = {
                peer: post[len(nonces[peer]) :]
                for peer, post in read.items()
                if peer in nonces and post.startswith(nonces[peer])
            }
            if stale and reposted:
                break  # our re-post was refused too: the others cannot count us in
            if stale:  # an earlier run's post: once more, past it (then like the first)
                reposted = True
                await bounded(
                    board.confirm(round_key, me.peer, me.nonce + group.group_id, expires_at),
                    config.board_timeout_s,
                )
                # Counted as posted until a read says otherwise: should the re-post land
                # unread, the others count us in and so must we.
                stale = False
                continue
        now = clock()
        if want <= seen.keys() or now >= deadline:
            break
        await sleep(max(0.0, min(_poll_interval(config, posts), deadline - now)))
    if stale:
        # The board kept an earlier post of ours (the store was refused): the others read
        # that one, so they will not count us in. Neither do we; and should our re-post
        # land after all, a withdrawal expiring later follows it.
        await withdraw(board, round_key, me, expires_at + 1.0, config.board_timeout_s)
        return NoGroup("no group formed: the board kept this peer's earlier confirmation")
    seen[me.peer] = group.group_id
    agreed = tuple(p for p in group.members if seen.get(p.peer) == group.group_id)
    if len(agreed) < config.min_group_size or all(p.client_mode for p in agreed):
        # Take back our confirmation: a member whose window closes later must not start an
        # all-reduce with us (a later expiry, or the DHT keeps the older record).
        await withdraw(board, round_key, me, expires_at + 1.0, config.board_timeout_s)
        if len(agreed) < config.min_group_size:
            other = sum(
                1 for p in group.members if seen.get(p.peer, group.group_id) != group.group_id
            )
            return NoGroup(
                f"no group formed: {len(agreed)} of {len(group.members)} members confirmed "
                f"the group within {config.confirm_timeout_s:g} s"
                + (f" ({other} left or derived another group)" if other else "")
            )
        return NoGroup("no group formed: the members that confirmed are all in client mode")
    if len(agreed) == len(group.members):
        return group
    digest = hashlib.blake2b(group.group_id + b"/confirmed", digest_size=16)
    for p in agreed:
        digest.update(p.peer)
    return Group(digest.digest(), agreed, confirmed_id=group.group_id)
