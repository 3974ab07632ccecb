"""One butterfly all-reduce round whose result is one weighted mean over one set of peers.

Member ``i`` of the group reduces part ``i`` of the flat vector (parts sized by
``partition.py``; clients have empty parts). A round, seen from one member:

1. **Reduce-scatter.** Send part ``j`` of the own vector (and the own weight) to member
   ``j``, for every non-empty part. As a reducer, collect contributions to the own part
   until everyone sent or the collect deadline; screen them (``aggregate.screen``).
2. **Report.** Tell every member which senders were accepted (and whom else it heard
   from). Wait for every reducer's report (or the report deadline). Reducers that did not
   report are presumed dead, and a reducer that heard from fewer than half as many members
   as the best-heard one is cut off (others cannot reach it; only when that keeps more
   contributors): both leave the contributor set, and their parts are reassigned
   round-robin to the other reducers. The round's contributor set ``C`` is the
   intersection of the accepted sets of the reducers kept, minus those left out.
3. **Repair.** Each member of ``C`` sends its raw part of each reassigned part to the
   survivor now in charge of it (every member keeps its raw vector until the round ends).
   A survivor missing one of them (that member left or died meanwhile, or its part was
   refused) cannot reduce the part over ``C``: it fails the round and leaves, so the
   others fail at once too.
4. **All-gather.** Each reducer combines its part(s) over exactly ``C`` and sends the
   result, tagged with ``C``, to every member. Members of ``C`` that sent the same
   non-empty tag with their contributions (several members of one group carrying that
   group's mean into a round across groups) count once.
5. **Commit.** A member succeeds only when every part arrived tagged with its own ``C``
   (and the same weight and contributors' tags);
   then every element of its result is the weighted mean over the same ``C``, and ``C`` is
   reported. Anything else before the deadline (a reducer died after reporting, members saw
   different reports, too few contributors) is a failed round: the caller's tensors are left
   untouched. A silent mix of parts averaged over different sets cannot be returned.

A member whose round is cancelled (its peer is stopping) sends every other member a
``Leave`` before it goes. From then on nobody waits for it: reducers close their collection
without its contribution, members stop waiting for its report (its part is reassigned like
a dead reducer's), and a part it was to send fails the round at once. A leave only ends
waits early; the commit rule above is what keeps results correct.

With a wire codec, contributions and results travel encoded; a reducer keeps the decoded
copy of what it sent, so every member ends with identical values.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence, Set
from typing import TypeVar

import torch

from shoal.compress import Codec
from shoal.parallel.data.aggregate import aggregate
from shoal.parallel.data.agreement import agreed_contributors, cut_off_reducers, heard_from
from shoal.parallel.data.buffers import BufferPool
from shoal.parallel.data.decoding import collect, decode_result, screen_contributions
from shoal.parallel.data.messages import (
    Contribution,
    Leave,
    Member,
    Reduced,
    Report,
    WireTensor,
    wire_numel,
)
from shoal.parallel.data.round import AllReduceConfig, RoundResult, RoundStatus
from shoal.parallel.data.sending import send_all, send_leave
from shoal.parallel.data.tags import counted_senders, screen_tags, unlike_twins
from shoal.parallel.data.transport import RoundTransport

__all__ = ["AllReduceConfig", "RoundResult", "RoundStatus", "run_allreduce"]

T = TypeVar("T")
_OFFLOAD_NUMEL = 1 << 20


async def _encode_off(codec: Codec | None, tensor: torch.Tensor) -> WireTensor:
    """Encode, on a worker thread when the part is big (raw parts need no work)."""
    if codec is None:
        return tensor
    return await _offload(tensor.numel(), codec.encode, tensor)


async def run_allreduce(
    transport: RoundTransport,
    round_id: bytes,
    members: Sequence[Member],
    ranges: Sequence[tuple[int, int]],
    flat: torch.Tensor,
    weight: float,
    deadline: float,
    *,
    codec: Codec | None = None,
    config: AllReduceConfig | None = None,
    buffers: BufferPool | None = None,
    screened: dict[Member, str] | None = None,
    tag: bytes = b"",
    check_tag: Callable[[Member, bytes, float], str | None] | None = None,
) -> tuple[RoundResult, dict[int, torch.Tensor] | None]:
    """Run one round; return the result and, on success, the reduced part of every range.

    ``tag`` says what ``flat`` stands for (see ``Contribution.tag``): members sending the
    same non-empty tag count once in every part, with the weight of the first of them in
    member order. ``check_tag(sender, tag, weight)`` says why a reducer refuses a
    contribution under that tag and weight (None: it may stand for them); contributions
    under one tag must carry the same values, or a reducer fails the round.

    ``screened``, when given, receives the senders whose messages this member refused
    itself (see ``RoundResult.screened``), also when the round fails.

    ``flat`` is only read (the caller writes the parts back, so no full-size buffer is
    allocated here). ``deadline`` is on the running loop's clock. The caller opens
    ``round_id`` in the inbox before peers may send (it is closed here at the end).
    """
    config = config or AllReduceConfig()
    if tag and config.aggregation.kind == "centered_clip":
        # Tagged contributions are group means (columns of a round across groups), and
        # several columns must reach the same bits: clipping looks at whole parts, which
        # the columns cut differently. A trimmed mean of the group means still outvotes
        # a lying group's member among three groups or more.
        config = dataclasses.replace(
            config, aggregation=dataclasses.replace(config.aggregation, kind="trimmed_mean")
        )
    loop = asyncio.get_running_loop()
    start = loop.time()
    budget = max(0.0, deadline - start)
    collect_at = start + config.collect_fraction * budget
    report_at = start + config.report_fraction * budget
    repair_at = start + config.repair_fraction * budget
    me = transport.me
    inbox = transport.inbox
    inbox.open(round_id, members, [b - a for a, b in ranges])
    live_parts = [j for j, (a, b) in enumerate(ranges) if b > a]
    my_part = members.index(me)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    left_round = False

    def msgs(kind: type, part: int | None = None) -> list:
        return [
            m
            for m in inbox.messages(round_id)
            if isinstance(m, kind)
            and m.sender in members
            and 0 <= m.part < len(members)
            and (part is None or m.part == part)
        ]

    def part_of(j: int) -> torch.Tensor:
        a, b = ranges[j]
        return flat[a:b]

    def left() -> set[Member]:  # the sender leaves itself, whatever index it gave
        return {m.sender for m in msgs(Leave)}

    try:
        # 1. Reduce-scatter: contributions out, own part's contributions in.
        sends = [
            (
                members[j],
                Contribution(round_id, me, j, weight, await _encode_off(codec, part_of(j)), tag),
            )
            for j in live_parts
        ]
        send_task = asyncio.ensure_future(send_all(transport, sends, collect_at))
        accepted: set[Member] = set()
        rejected: dict[Member, str] = {}
        contributions: dict[int, dict[Member, tuple[float, torch.Tensor]]] = {}
        seen: set[Member] = set()  # senders of contributions there at the collect deadline
        got: dict[Member, tuple[float, torch.Tensor]] = {}
        try:
            if my_part in live_parts:
                want = set(members)
                await inbox.wait_until(_have_all(msgs, my_part, want, left), collect_at)
                numel = part_of(my_part).numel()
                collected = msgs(Contribution, my_part)
                seen = {m.sender for m in collected}
                got = await _offload(numel if codec else 0, collect, collected, numel, codec)
                accepted, rejected = await _offload(
                    numel, screen_contributions, got, config.aggregation
                )
                screen_tags(collected, accepted, rejected, check_tag)
                if screened is not None:
                    screened.update(rejected)
                contributions[my_part] = {p: got[p] for p in accepted}
        except BaseException:  # e.g. cancelled: stop uploading now, not at collect_at
            send_task.cancel()
            await asyncio.wait((send_task,))
            raise
        unreachable = await send_task
        seconds["reduce_scatter"] = time.perf_counter() - t0

        # 2. Reports: agree on one contributor set.
        if my_part in live_parts:
            # Everyone heard from is in the report, used or not: a reducer that heard from
            # few is cut off (see agreement.py), and a slow sender does not make it unreachable.
            since = inbox.arriving(round_id, Contribution, my_part)
            since |= {m.sender for m in msgs(Contribution, my_part)}
            unused = {
                **{m: "late for the collect deadline" for m in since - seen},
                **{m: "unreadable contribution" for m in seen - got.keys()},
            }
            unused = {m: why for m, why in unused.items() if m in members}
            report = Report(round_id, me, my_part, frozenset(accepted), {**unused, **rejected})
            await send_all(transport, [(m, report) for m in members], report_at)
        await inbox.wait_until(
            lambda: (
                {r.part for r in msgs(Report) if r.sender == members[r.part]}
                | {members.index(m) for m in left()}
                >= set(live_parts)
            ),
            report_at,
        )
        reports = {
            r.part: r
            for r in msgs(Report)
            if r.sender == members[r.part] and r.part in live_parts  # a client reduces nothing
        }
        excluded: dict[Member, str] = {}
        for r in reports.values():
            excluded.update(r.rejected)
        silent = [j for j in live_parts if j not in reports]
        cut_off = cut_off_reducers(reports, members, silent, left())
        dead = sorted([*silent, *cut_off])
        alive = [j for j in live_parts if j not in dead]
        # A reducer left out (silent: presumed dead; cut off: few could reach it) takes its
        # own vector along: its slice of its own part is in no one else's hands.
        common = agreed_contributors(reports, members, dead)
        # Being left out as a reducer is why such a member is out of every part, so it
        # leads its reason; what a reducer said of its contribution (late, say) follows.
        left_out_as_reducer = {
            **{j: "no report from it as reducer (presumed dead)" for j in silent},
            **cut_off,
        }
        for j, why in left_out_as_reducer.items():
            earlier = excluded.get(members[j])
            excluded[members[j]] = f"{why}; {earlier}" if earlier else why
        for m in members:
            if m not in common and m not in excluded:
                excluded[m] = "contribution missing at a reducer"
        for m in left():
            if m not in common:
                excluded[m] = "left the round"
        seconds["report"] = time.perf_counter() - t0 - sum(seconds.values())
        if len(common) < config.min_contributors or not alive:
            why = (
                "no reducer reported"
                if not alive
                else f"{len(common)} of {len(members)} contributions kept by every reducer, "
                f"fewer than {config.min_contributors}"
            )
            return _failed(why + _left_out(excluded), excluded, seconds), None
        heard = max((heard_from(reports[j], members) for j in alive), default=0)
        if config.aggregation.kind != "mean" and len(common) < min(3, heard):
            # A robust rule cannot tell which of two is wrong, and a report is only what
            # its reducer says: one that "rejects" everyone but itself and one other would
            # otherwise turn the round into the mean of its own vector and one more.
            why = (
                f"{len(common)} contributions kept by every reducer, fewer than 3 "
                f"({config.aggregation.kind} of a pair is their mean)"
            )
            return _failed(why + _left_out(excluded), excluded, seconds), None
        reassigned = {j: members[alive[k % len(alive)]] for k, j in enumerate(dead)}

        # 3. Repair: raw parts of dead reducers' parts go to their substitutes.
        if me in common and dead:
            repair = [
                (
                    reassigned[j],
                    Contribution(
                        round_id, me, j, weight, await _encode_off(codec, part_of(j)), tag
                    ),
                )
                for j in dead
            ]
            await send_all(transport, repair, repair_at)
        mine = [j for j in dead if reassigned[j] == me]
        for j in mine:
            await inbox.wait_until(_have_all(msgs, j, common, left), repair_at)
            got = collect(msgs(Contribution, j), part_of(j).numel(), codec)
            ok, refused = screen_contributions(
                {p: got[p] for p in common if p in got}, config.aggregation
            )
            screen_tags(msgs(Contribution, j), ok, refused, check_tag)
            if screened is not None:
                screened.update(refused)
            contributions[j] = {p: got[p] for p in ok}
        seconds["repair"] = time.perf_counter() - t0 - sum(seconds.values())

        # 4. All-gather: reduce each own part over exactly the common set; the results go
        # out together, so a slow member holds none of them up behind another.
        order = [m for m in members if m in common]
        results: dict[int, torch.Tensor] = {}
        part_weight: dict[int, float] = {}
        part_tags: dict[int, dict[Member, bytes]] = {}
        broadcasts: list[tuple[Member, object]] = []
        own = ([my_part] if my_part in alive else []) + mine
        for j in own:
            lacking = sum(1 for p in order if p not in contributions.get(j, {}))
            if lacking:
                # A reassigned part without the raw part of an agreed contributor (it left
                # or died during the repair, or its part was refused): no one can reduce
                # it over the agreed set. Leave, so the others fail now, not at the deadline.
                left_round = True
                await send_leave(transport, round_id, members)
                why = f"part {j} lacks the raw parts of {lacking} agreed contributor(s)"
                return _failed(why + _left_out(excluded), excluded, seconds), None
        for j in own:
            have = contributions[j]
            numel = part_of(j).numel()
            sent = {m.sender: m.tag for m in msgs(Contribution, j) if m.tag}
            part_tags[j] = {p: sent[p] for p in order if p in sent}
            counted = counted_senders(order, part_tags[j])
            twins = await _offload(numel, unlike_twins, counted, part_tags[j], have)
            if twins:
                # One of them lies, and which cannot be told: this part has no value for
                # that tag, and the others' parts would: leave, so every member fails now.
                left_round = True
                await send_leave(transport, round_id, members)
                why = f"part {j}: contributions under one tag differ ({twins})"
                return _failed(why + _left_out(excluded), excluded, seconds), None
            reduced = await _offload(
                numel,
                functools.partial(aggregate, fused=not part_tags[j]),
                [have[p][1] for p in counted],
                [have[p][0] for p in counted],
                config.aggregation,
                buffers.tensor(numel) if buffers is not None else None,
            )
            part_weight[j] = sum(have[p][0] for p in counted)
            wire = await _encode_off(codec, reduced)
            try:  # as every other member checks it (finite inputs can sum past fp32)
                results[j] = decode_result(codec, wire)
            except ValueError as exc:  # they would refuse it: leave, so they fail now
                left_round = True
                await send_leave(transport, round_id, members)
                return _failed(f"own reduced part {j}: {exc}", excluded, seconds), None
            message = Reduced(round_id, me, j, common, part_weight[j], wire, part_tags[j])
            broadcasts += [(m, message) for m in members if m != me]
        if broadcasts:
            await send_all(transport, broadcasts, deadline)

        # 5. Commit: every part must carry the same contributor set.
        arrived: dict[int, Reduced] = {}

        def complete() -> bool:
            for r in msgs(Reduced):
                if (
                    r.part not in results
                    and r.part not in arrived
                    and r.contributors == common
                    and r.sender in (members[r.part], reassigned.get(r.part))
                ):
                    arrived[r.part] = r
            return all(j in results or j in arrived for j in live_parts)

        def abandoned() -> list[int]:  # parts whose sender left before sending them
            gone = left()
            return [
                j
                for j in live_parts
                if j not in results and j not in arrived and reassigned.get(j, members[j]) in gone
            ]

        if not await inbox.wait_until(lambda: complete() or bool(abandoned()), deadline):
            missing = sorted(j for j in live_parts if j not in results and j not in arrived)
            return _failed(f"parts {missing} missing at the deadline", excluded, seconds), None
        if not complete():
            why = f"parts {abandoned()} missing: their reducer left the round"
            return _failed(why, excluded, seconds), None

        def unusable(j: int, why: str, *, its_doing: bool = True) -> RoundResult:
            # An honest reducer checks its parts as we do before sending them (and leaves
            # when one fails), so a part that fails the check is the sender's doing, seen
            # here first-hand. Not a RuntimeError: that may be ours (memory, a worker
            # thread stopping with the peer).
            if screened is not None and its_doing:
                screened[arrived[j].sender] = f"its reduced part {j} was unusable: {why}"
            return _failed(f"part {j} from its reducer is unusable: {why}", excluded, seconds)

        for j, r in sorted(arrived.items()):
            if wire_numel(r.data) != part_of(j).numel():  # before decoding allocates it
                return unusable(j, "wrong size"), None
            try:  # big parts decode off the loop
                results[j] = await _offload(wire_numel(r.data), decode_result, codec, r.data)
            except (ValueError, RuntimeError) as exc:
                why = f"{type(exc).__name__}: {exc}"
                return unusable(j, why, its_doing=isinstance(exc, ValueError)), None
            if results[j].numel() != part_of(j).numel():
                return unusable(j, "wrong size once decoded"), None
            part_weight[j] = r.weight
            part_tags[j] = r.tags
        # Same contributors and the same weights everywhere give bit-identical totals; a
        # member that told reducers different weights (or tags) would make parts different
        # means.
        total_weight = part_weight[live_parts[0]] if live_parts else 0.0
        if any(part_weight[j] != total_weight for j in live_parts):
            return _failed("reducers saw different contributor weights", excluded, seconds), None
        tags = part_tags[live_parts[0]] if live_parts else {}
        if any(part_tags[j] != tags for j in live_parts):
            return _failed("reducers saw different contributor tags", excluded, seconds), None
        seconds["all_gather"] = time.perf_counter() - t0 - sum(seconds.values())
        for m, why in unreachable.items():
            excluded.setdefault(m, why)
        result = RoundResult(
            RoundStatus.OK,
            contributors=common,
            weight=total_weight,
            tags=dict(tags),
            excluded={m: why for m, why in excluded.items() if m not in common},
            reassigned=reassigned,
            seconds=seconds,
        )
        return result, {j: results[j] for j in live_parts}
    except asyncio.CancelledError:
        # Stopping mid-round: say so, or every other member waits for us until a deadline
        # (once: a leave already under way when the cancellation came has said it).
        if not left_round:
            await send_leave(transport, round_id, members)
        raise
    finally:
        inbox.close(round_id)


async def _offload(numel: int, fn: Callable[..., T], *args: object) -> T:
    """Run big tensor work on a worker thread (torch releases the GIL), small work inline."""
    if numel >= _OFFLOAD_NUMEL:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def _have_all(
    msgs: Callable[..., list], part: int, who: Set[Member], left: Callable[[], Set[Member]]
) -> Callable[[], bool]:
    """Every member of ``who`` that has not left sent its contribution to ``part``."""
    return lambda: who - left() <= {m.sender for m in msgs(Contribution, part)}


def _left_out(excluded: dict[Member, str], shown: int = 3) -> str:
    """``"; left out: a (why), b (why)"`` for a failed round's reason (a few, then a count)."""
    if not excluded:
        return ""
    parts = [f"{str(m)[:12]} ({why})" for m, why in list(excluded.items())[:shown]]
    more = f" and {len(excluded) - shown} more" if len(excluded) > shown else ""
    return "; left out: " + ", ".join(parts) + more


def _failed(reason: str, excluded: dict[Member, str], seconds: dict[str, float]) -> RoundResult:
    return RoundResult(RoundStatus.FAILED, excluded=excluded, reason=reason, seconds=seconds)
