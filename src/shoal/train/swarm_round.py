"""One averaging round over the swarm: meet on the DHT board, then all-reduce in place.

``SwarmRounds.average(vector, weight, round_key=..., expected_peers=...)`` runs on the
network loop. It announces this peer on the rendezvous board under ``round_key`` (every
peer of the round derives the same key, e.g. from the outer step), waits for the window to
close (``shoal.parallel.data.find_group``), and averages ``vector`` with the group that
formed. The outcome is a :class:`RoundOutcome`: ``ok`` means ``vector`` now holds the
weighted mean over ``contributors``; otherwise ``vector`` is untouched and ``reason`` says
why (alone, group too small, all-reduce failed, timeout). Nothing here raises for a
failed round: a lost round is an outcome, not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace

import torch

from shoal.errors import NetworkError
from shoal.net.aio import within
from shoal.net.identity import PeerID
from shoal.net.runtime import NetRuntime
from shoal.parallel.data.aggregate import AggregationConfig
from shoal.parallel.data.averager import Averager, GroupSpec
from shoal.parallel.data.dht_board import DhtBoard, RecordStore
from shoal.parallel.data.grpc_transport import GrpcTransport
from shoal.parallel.data.matchmaking import (
    FormationConfig,
    FormationEstimator,
    ReadyPeer,
    cross_groups,
    members_tag,
)
from shoal.parallel.data.rendezvous import Group, NoGroup, find_group
from shoal.parallel.data.round import AllReduceConfig
from shoal.parallel.data.sending import send_leave
from shoal.parallel.data.wire import MAX_GROUP_SIZE
from shoal.train.swarm_across import Across, ColumnTags, column_verdict, follow_up
from shoal.train.swarm_round_config import (
    DIAL_RESOLVE_S,
    MAX_RETRY_KEYS,
    RoundOutcome,
    RoundsConfig,
    announced_bandwidth,
    moving_average,
    retry_key,
)

__all__ = ["SwarmRounds"]

log = logging.getLogger(__name__)


def _follow_up_id(round_id: bytes, tag: bytes) -> bytes:
    """The round id of the follow-up exchange ``tag`` of round ``round_id`` (see
    :meth:`SwarmRounds.again`): every member of that round derives it alike."""
    return round_id[:32] + tag[:16]


class SwarmRounds:
    """Rendezvous on the DHT + butterfly all-reduce, for one peer (use on the network loop).

    A round of more ready peers than ``max_group_size`` is cut into groups; each group
    averages, then columns of members from every group average the groups' means
    (``matchmaking.cross_groups``), so every peer ends with the mean over everyone, as in one
    group, at 1.5 to 2 times one group's bytes. A column that lacks a group fails the round
    for its members (see :meth:`_across`)."""

    def __init__(
        self,
        runtime: NetRuntime,
        dht: RecordStore,
        *,
        swarm: str,
        config: RoundsConfig | None = None,
        own_address: Callable[[], str | None] | None = None,
        dial_address: Callable[[PeerID, str], Awaitable[str]] | None = None,
    ) -> None:
        """``own_address`` says where members dial this peer in the next round (None: it
        takes part as a client); ``dial_address`` turns a member's announced address into
        one to dial (e.g. through the member's relay). Defaults: the runtime's address, and
        addresses as announced."""
        self.runtime = runtime
        self.config = cfg = config or RoundsConfig()
        self.own_address = own_address or (lambda: runtime.address)  # clients: see average
        self.dial_address = dial_address
        self.transport = GrpcTransport.for_runtime(runtime)
        self.averager = Averager(
            self.transport,
            wire_codec=cfg.wire_codec,
            config=AllReduceConfig(
                min_contributors=cfg.min_contributors,
                aggregation=AggregationConfig(kind=cfg.aggregation),
            ),
        )
        self.board = DhtBoard(dht, prefix=f"shoal/v1/swarm/{swarm}/avg/".encode())
        self.estimator = FormationEstimator(
            FormationConfig(
                initial_s=cfg.window_initial_s,
                floor_s=min(cfg.window_floor_s, cfg.window_initial_s),
                cap_s=cfg.window_cap_s,
            )
        )
        self.uplink_bps: float | None = None
        """This peer's measured uplink, bits/s (moving average of each round's fastest send)."""
        self.downlink_bps: float | None = None
        """Its measured downlink, bits/s (the same of each round's fastest message received)."""
        self.last_group: GroupSpec | None = None
        """The contributors of the last successful round, as a group (for :meth:`again`)."""
        self.last_across: Across | None = None
        """Its column's contributors, when its stage across groups succeeded."""
        self._last_ok = False
        """The last round succeeded here (its stage across groups included)."""
        self._failed_column: GroupSpec | None = None
        """The last round's column, when its stage across groups failed here only: its
        other members may have committed, counting on this peer in a follow-up."""
        self._retry_keys: OrderedDict[bytes, bytes] = OrderedDict()
        """Round key -> the key its retry uses, for keys whose all-reduce failed here."""
        self._last_start: float | None = None
        """When the last :meth:`average` began (monotonic): the round period."""
        self.match = cfg.match  # the same settings round_deadline_s adds up

    async def average(
        self, vector: torch.Tensor, weight: float, *, round_key: bytes, expected_peers: int
    ) -> RoundOutcome:
        """Average the flat fp32 ``vector`` in place with whoever meets under ``round_key``.

        A key whose all-reduce failed here is not met under again: its board entries and
        confirmations are still live, and the same members would derive the same round id,
        which their inboxes remember as over. A retry (sync mode asks again for a step
        that failed) meets under a key derived from the failed group, which every member of
        that group derives alike.
        """
        # Peers with different wire codecs must not meet: int8 bytes read as int4 nibbles
        # decode to finite garbage.
        round_key = round_key + b"/" + self.config.wire_codec.encode()
        if self.config.aggregation != "mean":  # a robust round fails where a mean succeeds
            round_key += b"/" + self.config.aggregation.encode()
        for _ in range(MAX_RETRY_KEYS):
            if round_key not in self._retry_keys:
                break
            round_key = self._retry_keys[round_key]
        t0 = time.monotonic()
        cfg = self.config
        self.last_group = self.last_across = None  # until this round says otherwise
        self._last_ok = False
        self._failed_column = None
        period_s = 0.0 if self._last_start is None else t0 - self._last_start
        self._last_start = t0
        address = None if cfg.client_mode else self.own_address()
        me = ReadyPeer(
            self.runtime.peer_id.raw,
            float(weight),
            announced_bandwidth(self.uplink_bps or cfg.bandwidth_prior_bps),
            address is None,
            address or "",  # a client is never dialed
            # Not measured yet: 0, taken as the uplink.
            downlink_bps=announced_bandwidth(self.downlink_bps) if self.downlink_bps else 0.0,
        )
        confirmed: list[Group] = []  # told we leave, should we be cancelled
        column: Group | None = None  # this peer's seat in the stage across groups
        try:
            group = await find_group(
                self.board,
                round_key,
                me,
                expected_peers=max(2, expected_peers),
                estimator=self.estimator,
                config=self.match,
                clock=time.time,
                on_confirm=confirmed.append,
                min_window_s=cfg.window_period_fraction * period_s,
            )
            if isinstance(group, Group):
                confirmed[:] = [group]  # the agreed group: perhaps a subset of the one confirmed
                if group.confirmed_id:  # a member stopped as it confirmed names that one
                    self.transport.inbox.alias_leaves(group.confirmed_id, group.group_id)
                column = self._column(round_key, group.round_groups)
                if column is None:
                    group = await self._dialable(group)
                else:
                    confirmed.append(column)
                    group, column = await asyncio.gather(
                        self._dialable(group), self._dialable(column)
                    )
        except (NetworkError, asyncio.TimeoutError) as exc:
            return RoundOutcome(False, reason=f"matchmaking failed: {exc}")
        except asyncio.CancelledError:
            # Stopped between confirming a group and its all-reduce (where the averager
            # says it leaves): the others may already count on us.
            await self._leave(*confirmed)
            raise
        t1 = time.monotonic()
        seconds = {"matchmaking": t1 - t0}
        if isinstance(group, NoGroup):
            # Its column's members derived it in their column: tell them not to wait.
            missed = self._column(round_key, group.round_groups)
            if missed is not None:
                await self._leave(missed)
            return RoundOutcome(False, reason=group.reason, seconds=seconds)
        original = None
        if column is not None:
            # What a failure restores: the stage across groups may fail after ours
            # succeeded. Off the loop, as the vector may be big.
            try:
                original = await asyncio.to_thread(vector.clone)
            except asyncio.CancelledError:
                await self._leave(*confirmed)
                raise
        spec = self.transport.join(group)  # shares follow the announced links
        members = list(spec.members)
        self.averager.prepare(spec)
        across = None
        if column is not None:
            # Held from now, and bounded by its part sizes: the members of a group that
            # finished first may send before ours has.
            across = Across(self.transport.join(column), group.round_groups)
            self.averager.prepare(across.column, vector.numel(), tagged=True)
        result = None
        try:
            result = await self.averager.average(
                [vector], weight, group=spec, timeout_s=self.config.allreduce_timeout_s
            )
        finally:
            if result is None or not result.ok:  # failed, raised or cancelled mid-round
                self._failed_key(round_key, group.group_id)
                if across is not None:  # no mean of our group to bring there
                    await self._abandon(across.column)
        seconds["allreduce"] = time.monotonic() - t1
        self._observe_links()
        self._penalize(result.screened)
        if not result.ok:
            return RoundOutcome(
                False, group_size=len(members), reason=result.reason, seconds=seconds
            )
        contributors = frozenset(p for p in result.contributors if isinstance(p, PeerID))
        own = self.runtime.peer_id
        included = own in contributors
        left_out = "" if included else result.excluded.get(own) or "left out"
        kept = [i for i, m in enumerate(members) if m in contributors]
        self.last_group = spec.subgroup(kept, group.group_id)
        outcome = RoundOutcome(
            True,
            contributors=contributors,
            weight=result.weight,
            group_size=len(members),
            reason="" if included else f"own contribution left out: {left_out}",
            seconds=seconds,
            included=included,
        )
        if across is not None and original is not None:
            until = t1 + 2 * cfg.allreduce_timeout_s
            why = await self._across(vector, original, outcome, across, until=until)
            if why:
                self._failed_key(round_key, group.group_id)
                self._failed_column = across.column
                return RoundOutcome(
                    False, group_size=len(members), reason=f"across groups: {why}", seconds=seconds
                )
        self._last_ok = True
        return outcome

    def _failed_key(self, round_key: bytes, group_id: bytes) -> None:
        """Meet under another key when ``round_key`` is tried again (see :meth:`average`)."""
        self._retry_keys[round_key] = retry_key(round_key, group_id)
        while len(self._retry_keys) > MAX_RETRY_KEYS:
            self._retry_keys.popitem(last=False)

    def _column(self, round_key: bytes, groups: tuple[Group, ...]) -> Group | None:
        """This peer's column of the stage across ``groups`` (the round's, when it was cut
        into several), if it has a seat in one (clients beyond ``max_group_size`` too:
        a column without a reducer joins one that has one)."""
        columns = cross_groups(round_key, groups, max_group_size=MAX_GROUP_SIZE)
        me = self.runtime.peer_id.raw
        return next((c for c in columns if any(p.peer == me for p in c.members)), None)

    async def _across(
        self,
        vector: torch.Tensor,
        original: torch.Tensor,
        outcome: RoundOutcome,
        across: Across,
        *,
        until: float,
    ) -> str:
        """The stage of a round cut into several groups: average this group's mean (in
        ``vector``) with the other groups' in this peer's column, tagged with this group's
        contributors, so a group counts once whichever of its members reach the column.

        On success ``vector`` and ``outcome`` stand for the whole round (the column held
        every group: ``column_verdict``); else ``vector`` gets its ``original`` values back
        (also when cancelled) and the reason is returned. The budget ends at ``until``
        (monotonic) for every member, counted from the round's start rather than from each
        one's own: a group whose round waited out a dead member starts here late, and would
        miss the others' collect deadlines otherwise."""
        try:
            why = await self._column_round(vector, outcome, across, until=until)
        except asyncio.CancelledError:
            vector.copy_(original)
            raise
        if why:
            vector.copy_(original)
        return why

    async def _column_round(
        self, vector: torch.Tensor, outcome: RoundOutcome, across: Across, *, until: float
    ) -> str:
        t0 = time.monotonic()
        if until - t0 <= 0:
            return "no time left for the stage across groups"
        rules = ColumnTags(across.groups, counted=self.config.aggregation != "mean")
        tag = members_tag(rules.order, (p.raw for p in outcome.contributors))
        # A robust rule trusts no claimed weight: a group then weighs its contributors.
        weight = float(len(outcome.contributors)) if rules.counted else outcome.weight
        result = await self.averager.average(
            [vector],
            weight,
            group=across.column,
            timeout_s=until - t0,
            tag=tag,
            check_tag=rules.refused,
        )
        outcome.seconds["across"] = time.monotonic() - t0
        self._observe_links()
        self._penalize(result.screened)
        if not result.ok:
            return result.reason
        why, represented = column_verdict(rules, result)
        if why:
            return why
        self.last_across = follow_up(across, result, represented)
        outcome.contributors = frozenset(PeerID(raw) for raw in represented)
        outcome.weight = result.weight
        outcome.group_size = len(rules.order)  # as for one group: every member, left out or not
        return ""

    async def _abandon(self, column: GroupSpec) -> None:
        """Give up this peer's seat in a column it will not reach (its group's round
        failed): stop holding the column's messages, and tell its members."""
        self.transport.inbox.close(column.round_id)
        await send_leave(self.transport, column.round_id, column.members)

    def skipped(self) -> None:
        """A round was not tried (no peer to average with): the round period restarts now,
        so the first window after a lonely spell is not stretched by its length."""
        self._last_start = time.monotonic()

    async def _leave(self, *groups: Group) -> None:
        """Tell each group's members that this peer leaves its round (a subset of a group
        that went on under another id counts it too: ``Inbox.alias_leaves``)."""

        async def leave(group: Group) -> None:
            with contextlib.suppress(Exception):  # the caller must see its cancellation
                spec = self.transport.join(group)  # their addresses
                await send_leave(self.transport, group.group_id, spec.members)

        await asyncio.gather(*(leave(g) for g in groups))

    async def _dialable(self, group: Group) -> Group:
        """``group`` with every member's address as this peer dials it (a member that cannot
        be resolved within ``DIAL_RESOLVE_S`` keeps no address: sends to it fail, and the
        round goes on without it). Members resolve at once, not one after another: a round
        of relayed members would otherwise spend their dial times in sum."""
        dial = self.dial_address
        if dial is None:
            return group

        async def resolve(entry: ReadyPeer) -> ReadyPeer:
            if not entry.address or entry.peer == self.runtime.peer_id.raw:
                return entry
            try:
                address = await within(dial(PeerID(entry.peer), entry.address), DIAL_RESOLVE_S)
            except (NetworkError, TimeoutError) as exc:
                log.info("cannot reach round member %s: %s", entry.address, exc)
                address = ""
            return replace(entry, address=address)

        members = await asyncio.gather(*(resolve(entry) for entry in group.members))
        return replace(group, members=tuple(members))

    def _penalize(self, screened: Mapping[object, str]) -> None:
        """Count every message this peer refused itself against its sender (a contribution
        screened out as a reducer, an unusable result part): garbage (not a number, too
        large, an impossible weight) from the same peer in two rounds within about half a
        minute, or three within two minutes, bans it (``HealthConfig``: 5 points, halving
        every 60 s; one refused round may be an accident, such as a loss spike). A banned
        peer is not dialed: its part hears from no one who banned it, and once most members
        have, it is cut off (``agreement.py``). Only what this peer saw counts: a report's
        claims about others could be lies."""
        for peer, why in screened.items() if self.config.screened_penalty else ():
            if not isinstance(peer, PeerID) or peer == self.runtime.peer_id:
                continue
            if self.runtime.penalize(peer, self.config.screened_penalty):
                log.warning("banning %s for a while: what it sent was refused (%s)", peer, why)

    def _observe_links(self) -> None:
        self.uplink_bps = moving_average(self.uplink_bps, self.transport.uplink_sample())
        self.downlink_bps = moving_average(self.downlink_bps, self.transport.downlink_sample())

    async def decline_again(self, tag: bytes) -> None:
        """Say that this peer takes no part in the follow-up exchange ``tag`` of the last
        round (see :meth:`again`), which the other contributors of its group (and of its
        column, should the column's round have failed here only) run counting on it: its
        group succeeded, and the stage across groups failed here. They then go on without
        it at once instead of at the collect deadline. Never raises."""
        last = self.last_group
        if last is None or self._last_ok or self.runtime.peer_id not in last.members:
            return
        leaves = [send_leave(self.transport, _follow_up_id(last.round_id, tag), last.members)]
        column = self._failed_column
        if column is not None:  # the others' column holds the contributors they agreed on
            again = _follow_up_id(column.round_id, tag)
            leaves.append(send_leave(self.transport, again, column.members, exact=False))
        await asyncio.gather(*leaves)

    async def again(self, vector: torch.Tensor, weight: float, *, tag: bytes) -> RoundOutcome:
        """A follow-up all-reduce with the last round's contributors, without matchmaking.

        Every contributor of the last round derives the same group (the contributor set is
        agreed by the all-reduce), so a second exchange of the same round (e.g. the Q
        factors of a low-rank round) needs no rendezvous. A round that went on across
        groups goes on again with the same column's contributors.
        """
        last = self.last_group
        if last is None or not self._last_ok:
            return RoundOutcome(False, reason="the last round did not succeed here")
        if all(last.client_mode):  # a reducer can contribute nothing itself (all screened out)
            return RoundOutcome(False, reason="no reducer among the last round's contributors")
        if self.runtime.peer_id not in last.members:
            return RoundOutcome(False, reason="this peer was left out of the last round")
        spec = replace(last, round_id=_follow_up_id(last.round_id, tag))
        across = self.last_across
        if across is not None and self.runtime.peer_id not in across.column.members:
            # Its column went on without it (its group's mean came by a twin): a group's
            # mean alone is not this exchange's result, so it takes no part.
            await send_leave(self.transport, spec.round_id, spec.members)
            return RoundOutcome(False, reason="this peer was left out of its column last round")
        original = None
        if across is not None:
            column = replace(across.column, round_id=_follow_up_id(across.column.round_id, tag))
            across = replace(across, column=column)
            try:
                original = await asyncio.to_thread(vector.clone)  # off the loop: may be big
            except asyncio.CancelledError:
                await send_leave(self.transport, spec.round_id, spec.members)
                await send_leave(self.transport, column.round_id, column.members)
                raise
            self.averager.prepare(column, vector.numel(), tagged=True)
        self.averager.prepare(spec)
        t0 = time.monotonic()
        result = None
        try:
            result = await self.averager.average(
                [vector], weight, group=spec, timeout_s=self.config.allreduce_timeout_s
            )
        finally:
            if across is not None and (result is None or not result.ok):
                await self._abandon(across.column)
        self._observe_links()
        self._penalize(result.screened)
        seconds = {"allreduce": time.monotonic() - t0}
        if not result.ok:
            return RoundOutcome(
                False, group_size=len(spec.members), reason=result.reason, seconds=seconds
            )
        contributors = frozenset(p for p in result.contributors if isinstance(p, PeerID))
        outcome = RoundOutcome(
            True,
            contributors=contributors,
            weight=result.weight,
            group_size=len(spec.members),
            seconds=seconds,
            included=self.runtime.peer_id in contributors,
        )
        if across is not None and original is not None:
            until = t0 + 2 * self.config.allreduce_timeout_s
            why = await self._across(vector, original, outcome, across, until=until)
            if why:
                return RoundOutcome(
                    False,
                    group_size=len(spec.members),
                    reason=f"across groups: {why}",
                    seconds=seconds,
                )
        return outcome
