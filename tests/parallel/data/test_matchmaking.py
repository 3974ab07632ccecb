"""Window estimation, group formation and the rendezvous loop, all on a fake clock."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from shoal.dht.virtual_loop import run_virtual
from shoal.errors import ConfigError
from shoal.parallel.data.board import MemoryBoard
from shoal.parallel.data.matchmaking import (
    FormationConfig,
    FormationEstimator,
    Group,
    ReadyPeer,
    cross_groups,
    form_groups,
    members_tag,
    round_order,
    tag_members,
    window_closed,
)
from shoal.parallel.data.rendezvous import MatchConfig, NoGroup, find_group


def test_window_follows_history_within_floor_and_cap():
    est = FormationEstimator(FormationConfig(initial_s=5.0, floor_s=0.5, cap_s=30.0))
    assert est.window_s() == 5.0
    for _ in range(50):
        est.observe(2.0)
    assert est.window_s() == pytest.approx(2.0, abs=0.05)  # deviation decays
    for _ in range(50):
        est.observe(0.01)
    assert est.window_s() == 0.5
    assert est.window_s(at_least_s=4.0) == 4.0  # e.g. a share of the round period
    for _ in range(50):
        est.observe(100.0)
    assert est.window_s() == 30.0
    assert est.window_s(at_least_s=45.0) == 30.0  # the cap still holds
    jittery = FormationEstimator(FormationConfig(cap_s=60.0))
    for i in range(50):
        jittery.observe(1.0 if i % 2 else 3.0)
    assert jittery.window_s() > 3.0  # variable history earns margin


def test_window_closes_when_full_or_expired():
    assert window_closed(now=1.0, opened_at=0.0, window_s=5.0, n_ready=4, expected_peers=4)
    assert not window_closed(now=1.0, opened_at=0.0, window_s=5.0, n_ready=3, expected_peers=4)
    assert window_closed(now=5.0, opened_at=0.0, window_s=5.0, n_ready=1, expected_peers=4)
    with pytest.raises(ConfigError, match="initial_s"):
        FormationConfig(initial_s=100.0, cap_s=60.0)


def _peers(n: int, clients: int = 0) -> list[ReadyPeer]:
    return [ReadyPeer(bytes([i]) * 32, 1.0, 1e8, client_mode=i < clients) for i in range(n)]


@pytest.mark.parametrize("n,max_size", [(9, 4), (10, 4), (20, 8), (81, 64), (256, 64)])
def test_columns_across_groups_seat_everyone_with_every_group_in_each(n, max_size):
    groups = form_groups(b"r", _peers(n), max_group_size=max_size)
    assert len(groups) > 1
    columns = cross_groups(b"r", groups, max_group_size=max_size)
    seated = [p.peer for c in columns for p in c.members]
    assert sorted(seated) == sorted(p.peer for p in _peers(n))  # each once
    group_of = {p.peer: i for i, g in enumerate(groups) for p in g.members}
    for column in columns:
        counts = [sum(group_of[p.peer] == i for p in column.members) for i in range(len(groups))]
        assert min(counts) >= 1 and max(counts) <= 2, counts
    # every reader derives the same columns, and group ids differ from the groups'
    again = form_groups(b"r", list(reversed(_peers(n))), max_group_size=max_size)
    assert cross_groups(b"r", again, max_group_size=max_size) == columns
    assert not {c.group_id for c in columns} & {g.group_id for g in groups}


def test_a_column_without_a_reducer_joins_one_that_has_one():
    # 2 groups of 5, each with 2 reducers: columns 2 to 4 would hold only clients.
    peers = [ReadyPeer(bytes([i]) * 32, 1.0, 1e8, client_mode=i >= 4) for i in range(10)]
    groups = form_groups(b"r", peers, max_group_size=5)
    assert [sum(not p.client_mode for p in g.members) for g in groups] == [2, 2]
    columns = cross_groups(b"r", groups, max_group_size=6)
    assert all(any(not p.client_mode for p in c.members) for c in columns)
    assert sorted(len(c.members) for c in columns) == [4, 6]
    # no room for them: the clients of those columns skip the second stage
    tight = cross_groups(b"r", groups, max_group_size=2)
    assert [len(c.members) for c in tight] == [2, 2]


def test_one_group_has_no_columns():
    groups = form_groups(b"r", _peers(4), max_group_size=4)
    assert cross_groups(b"r", groups, max_group_size=4) == []


def test_a_tag_marks_exactly_the_peers_it_was_made_of():
    groups = form_groups(b"r", _peers(20), max_group_size=8)
    order = round_order(groups)
    assert sorted(order) == sorted(p.peer for p in _peers(20))
    some = set(order[::3])
    tag = members_tag(order, [*some, b"\xff" * 32])  # a stranger is not marked
    assert len(tag) == 3 and tag_members(order, tag) == some
    assert tag_members(order, b"") == set()
    assert tag_members(order[:4], b"\xff" * 8) == set(order[:4])  # bits past the order


def test_groups_are_bounded_balanced_and_identical_for_every_view_order():
    peers = _peers(10, clients=3)
    groups = form_groups(b"round-1", peers, max_group_size=4)
    again = form_groups(b"round-1", list(reversed(peers)), max_group_size=4)
    assert groups == again
    sizes = sorted(len(g.members) for g in groups)
    assert sizes == [3, 3, 4]
    assert all(any(not p.client_mode for p in g.members) for g in groups)
    assert sorted(p.peer for g in groups for p in g.members) == sorted(p.peer for p in peers)
    assert len({g.group_id for g in groups}) == 3
    assert form_groups(b"round-2", peers, max_group_size=4) != groups


def test_groups_stay_within_their_size_when_few_peers_can_reduce():
    # One peer accepts connections, twenty are clients: one group of at most 8, not 21.
    peers = _peers(21, clients=20)
    (group,) = form_groups(b"round-1", peers, max_group_size=8)
    assert len(group.members) == 8 and peers[20] in group.members
    seated = {p.peer for p in group.members}
    (later,) = form_groups(b"round-2", peers, max_group_size=8)
    assert {p.peer for p in later.members} != seated  # other clients get the next seats


def test_a_client_left_without_a_seat_is_told_why():
    peers = _peers(12, clients=11)
    (group,) = form_groups(b"k", peers, max_group_size=4)
    unseated = next(p for p in peers if p not in group.members)

    async def main():
        board = MemoryBoard(_loop_time)
        for p in peers:
            if p is not unseated:
                await board.announce(b"k", p, expires_at=100.0)
        return await _meet(board, unseated, window_s=2.0, expected=12, max_group=4)

    outcome = run_virtual(main())
    assert outcome == NoGroup(
        "no group formed: 12 peers were ready and only 1 accept connections, which seats "
        "at most 4 in groups of 4; this client waits for a later round"
    )


def test_a_large_minimum_group_size_seats_one_full_group_rather_than_none():
    peers = _peers(11, clients=6)
    (group,) = form_groups(b"r", peers, max_group_size=8, min_group_size=8)
    assert len(group.members) == 8
    assert {p for p in peers if not p.client_mode} <= set(group.members)  # reducers first
    assert form_groups(b"r", _peers(7), max_group_size=8, min_group_size=8) == []


def test_lonely_peer_and_client_only_groups_skip_the_round():
    assert form_groups(b"r", _peers(1), max_group_size=4) == []
    assert form_groups(b"r", _peers(3, clients=3), max_group_size=4) == []


def test_find_group_says_why_when_every_ready_peer_is_a_client():
    peers = _peers(3, clients=3)

    async def main():
        board = MemoryBoard(_loop_time)
        return await asyncio.gather(*(_meet(board, p, window_s=1.0, expected=3) for p in peers))

    outcomes = run_virtual(main())
    assert all(
        isinstance(o, NoGroup) and "all 3 ready peers are in client mode" in o.reason
        for o in outcomes
    ), outcomes


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


async def _meet(
    board, peer, *, window_s, expected=4, start_at=0.0, confirm_s=5.0, est=None, max_group=8
):
    """One peer's matchmaking on the virtual clock, starting at ``start_at``."""
    await asyncio.sleep(start_at)
    return await find_group(
        board,
        b"k",
        peer,
        expected_peers=expected,
        estimator=est or FormationEstimator(FormationConfig(initial_s=window_s)),
        config=MatchConfig(
            max_group_size=max_group, poll_interval_s=0.25, confirm_timeout_s=confirm_s
        ),
        clock=_loop_time,
    )


@pytest.mark.parametrize(("others", "reads"), [(3, 41), (127, 11)])
def test_a_board_with_many_entries_is_read_less_often(others, reads):
    # Everyone polls one key: at a fixed pace the bytes read grow with the square of the
    # peers. 4 entries are read every 0.25 s through a 10 s window; 128 every 1 s.
    peers = _peers(others + 1)

    class Counting(MemoryBoard):
        reads = 0

        async def entries(self, key):
            Counting.reads += 1
            return await super().entries(key)

    async def main():
        board = Counting(_loop_time)
        for p in peers[1:]:
            await board.announce(b"k", p, expires_at=100.0)
        await _meet(board, peers[0], window_s=10.0, expected=others + 2, confirm_s=0.5)

    run_virtual(main())
    assert Counting.reads == reads


def test_a_window_that_runs_out_does_not_lengthen_the_next():
    # Observed, a timed-out window grew the next one by its deviation each time: with a
    # dead peer still in the views the windows climbed 3, 3.7, 6.4, 11, 19 s.
    a, b = _peers(2)
    est = FormationEstimator(FormationConfig(initial_s=3.0, floor_s=0.5))
    for _ in range(10):
        est.observe(0.3)  # everyone used to come together
    before = est.window_s()

    async def main():
        board = MemoryBoard(_loop_time)
        for k in range(4):  # c is expected, but never comes
            key_a, key_b = replace(a, nonce=bytes([k]) * 8), replace(b, nonce=bytes([k]) * 8)
            groups = await asyncio.gather(
                *(_meet(board, p, window_s=3.0, expected=3, est=est) for p in (key_a, key_b))
            )
            assert all(isinstance(g, Group) and len(g.members) == 2 for g in groups)

    run_virtual(main())
    assert est.window_s() == before


def test_find_group_closes_early_when_everyone_is_ready_and_learns_the_time():
    peers = _peers(4)
    est = FormationEstimator(FormationConfig(initial_s=5.0))

    async def main():
        board = MemoryBoard(_loop_time)
        groups = await asyncio.gather(
            _meet(board, peers[0], window_s=5.0, est=est),
            *(_meet(board, p, window_s=5.0) for p in peers[1:]),
        )
        return groups, _loop_time()

    groups, ended = run_virtual(main())
    assert all(isinstance(g, Group) and len(g.members) == 4 for g in groups)
    assert len({g.group_id for g in groups}) == 1
    assert ended < 1.0  # nobody waited for the 5 s window
    assert est.mean_s is not None and est.mean_s < 1.0


def test_find_group_waits_the_window_then_goes_with_who_came():
    peers = _peers(4)

    async def main():
        board = MemoryBoard(_loop_time)
        groups = await asyncio.gather(*(_meet(board, p, window_s=2.0) for p in peers[:2]))
        return groups, _loop_time()

    groups, ended = run_virtual(main())
    assert all(isinstance(g, Group) for g in groups)
    assert {p.peer for p in groups[0].members} == {peers[0].peer, peers[1].peer}
    assert groups[0].group_id == groups[1].group_id
    assert 2.0 <= ended < 3.0


@pytest.mark.parametrize(
    ("a_window", "b_window", "b_start", "b_ends_by", "why_a", "why_b"),
    [
        # a waits 1 s alone and leaves; b arrives later, still sees a's entry on the board,
        # and a's withdrawal answers for it: b does not wait out the 2 s confirmation
        (
            1.0,
            1.0,
            1.5,
            1.5 + 1.0 + 0.5,
            "no other peer was ready for this round",
            " (1 left or derived another group)",
        ),
    ],
)
def test_a_peer_that_left_is_not_in_a_later_peers_group(
    a_window, b_window, b_start, b_ends_by, why_a, why_b
):
    a, b = _peers(2)

    async def main():
        board = MemoryBoard(_loop_time)
        return await asyncio.gather(
            _meet(board, a, window_s=a_window, expected=3, confirm_s=2.0),
            _meet(board, b, window_s=b_window, expected=3, start_at=b_start, confirm_s=2.0),
        ), _loop_time()

    (group_a, group_b), ended = run_virtual(main())
    assert group_a == NoGroup(f"no group formed: {why_a}")
    # without confirmation (and withdrawal) b would wait on a in an all-reduce
    assert group_b == NoGroup(
        f"no group formed: 1 of 2 members confirmed the group within 2 s{why_b}"
    )
    assert ended <= b_ends_by


def test_a_retry_under_the_same_key_ignores_the_last_attempts_posts():
    # Sync mode asks again under the same key after "no group formed". Attempt 1 ends with
    # a alone, b in {a, b} and c in {a, b, c}, all without a group; their confirmations
    # (and withdrawals) are still on the board when attempt 2 starts.
    a, b, c = _peers(3)

    async def attempt(board, who, at):
        await asyncio.sleep(at - _loop_time())
        return await asyncio.gather(
            *(
                _meet(board, p, window_s=1.0, expected=3, start_at=i * 0.1, confirm_s=2.0)
                for i, p in enumerate(who)
            )
        )

    async def main():
        board = MemoryBoard(_loop_time)
        first = await asyncio.gather(
            _meet(board, a, window_s=1.0, expected=3, confirm_s=2.0),
            _meet(board, b, window_s=1.0, expected=3, start_at=1.5, confirm_s=2.0),
            _meet(board, c, window_s=1.0, expected=3, start_at=2.6, confirm_s=2.0),
        )
        everyone = await attempt(board, (a, b, c), 6.0)
        without_c = await attempt(board, (a, b), 12.0)  # c has left; its posts remain
        return first, everyone, without_c

    first, everyone, without_c = run_virtual(main())
    assert all(isinstance(g, NoGroup) for g in first)
    # Before nonces: a derived {a, c} from b's old post, b and c {a, b, c}; and with c
    # gone, a and b still put c in their group (its old entry and confirmation matched).
    assert all(isinstance(g, Group) for g in everyone + without_c)
    assert len({g.group_id for g in everyone}) == 1 and len(everyone[0].members) == 3
    assert without_c[0] == without_c[1]
    assert {p.peer for p in without_c[0].members} == {a.peer, b.peer}


def test_a_refused_write_leaves_both_peers_without_a_group_not_one_waiting():
    # The DHT refuses a write that expires before the record it would replace. If a peer's
    # new confirmation is refused, the others read its earlier one and count it out; it
    # must not count itself in and wait alone in an all-reduce.
    a, b = _peers(2)

    class RefusingBoard(MemoryBoard):
        async def confirm(self, key, peer, group_id, expires_at):
            old = self._confirmed.get(key, {}).get(peer)
            if old is None or old[1] < expires_at:
                await super().confirm(key, peer, group_id, expires_at)

    async def main():
        board = RefusingBoard(_loop_time)
        await board.confirm(b"k", a.peer, b"o" * 8 + b"x" * 16, expires_at=1000.0)
        return await asyncio.gather(
            *(_meet(board, p, window_s=1.0, expected=2, confirm_s=1.0) for p in (a, b))
        )

    group_a, group_b = run_virtual(main())
    assert group_a == NoGroup("no group formed: the board kept this peer's earlier confirmation")
    assert isinstance(group_b, NoGroup)


def test_a_slow_board_cannot_stretch_matchmaking_past_its_bound():
    a, b = _peers(2)

    class SlowBoard(MemoryBoard):
        async def entries(self, key):
            await asyncio.sleep(10.0)
            return await super().entries(key)

        async def confirm(self, key, peer, group_id, expires_at):
            await asyncio.sleep(12.0)
            await super().confirm(key, peer, group_id, expires_at)

    async def main():
        board = SlowBoard(_loop_time)
        config = MatchConfig(poll_interval_s=0.25)
        outcomes = await asyncio.gather(
            *(
                find_group(
                    board,
                    b"k",
                    p,
                    expected_peers=2,
                    estimator=FormationEstimator(FormationConfig(initial_s=5.0)),
                    config=config,
                    clock=_loop_time,
                )
                for p in (a, b)
            )
        )
        return outcomes, _loop_time(), config

    outcomes, ended, config = run_virtual(main())
    assert all(
        isinstance(o, NoGroup) and "no read of the board finished" in o.reason for o in outcomes
    ), outcomes
    assert ended <= 5.0 + config.overrun_s + config.board_timeout_s  # + the withdrawal


def test_members_that_derived_another_group_are_left_out_consistently():
    a, b, c = _peers(3)

    async def main():
        board = MemoryBoard(_loop_time)
        await board.announce(b"k", c, expires_at=100.0)
        await board.confirm(b"k", c.peer, b"x" * 16, expires_at=100.0)  # c saw another board
        return await asyncio.gather(
            _meet(board, a, window_s=1.0, expected=3), _meet(board, b, window_s=1.0, expected=3)
        )

    group_a, group_b = run_virtual(main())
    assert group_a is not None and group_b is not None
    assert {p.peer for p in group_a.members} == {a.peer, b.peer}
    assert group_a == group_b
    unconfirmed = form_groups(b"k", [a, b, c], max_group_size=8)[0]
    assert group_a.group_id != unconfirmed.group_id  # a different all-reduce session than c's


def test_a_peer_with_a_stale_membership_view_waits_for_the_group_the_others_expect():
    # The first peer believes it is one of 2 trainers (its view lags, as right after it
    # started); three more arrive one by one, each seeing all 4. Closing as soon as a second
    # peer shows up would put the first in a group nobody else derives and split the round.
    peers = _peers(4)

    async def main():
        board = MemoryBoard(_loop_time)
        return await asyncio.gather(
            _meet(board, peers[0], window_s=10.0, expected=2),
            *(_meet(board, p, window_s=10.0, start_at=1.0 + i) for i, p in enumerate(peers[1:])),
        ), _loop_time()

    groups, ended = run_virtual(main())
    assert all(isinstance(g, Group) and len(g.members) == 4 for g in groups)
    assert len({g.group_id for g in groups}) == 1
    assert ended < 4.0  # closed when the fourth arrived, not at the 10 s window


def test_an_inflated_expectation_cannot_hold_a_full_group_past_its_size():
    # A peer claiming 10,000 trainers can at most make others wait for a full group.
    a, b = _peers(2)
    greedy = ReadyPeer(b"\x09" * 32, 1.0, 1e8, expected=10_000)

    async def main():
        board = MemoryBoard(_loop_time)
        await board.announce(b"k", greedy, expires_at=100.0)
        await board.confirm(b"k", greedy.peer, b"x" * 16, expires_at=100.0)
        return await asyncio.gather(
            *(_meet(board, p, window_s=10.0, expected=2, max_group=3) for p in (a, b))
        ), _loop_time()

    (group_a, group_b), ended = run_virtual(main())
    assert ended < 1.0  # 3 ready = a full group of 3: no need to wait out the window
    # the odd one out derived another group, so a and b go on without it
    assert group_a == group_b and {p.peer for p in group_a.members} == {a.peer, b.peer}


def test_a_peer_cancelled_inside_its_window_withdraws_and_the_others_go_on_at_once():
    # c stops (SIGTERM) while its window is open. a and b still see its entry and put it in
    # their group; its withdrawal tells them at their first confirmation read. Before, they
    # waited out the whole confirmation timeout (5 s) for a post that never came.
    a, b, c = _peers(3)

    async def main():
        board = MemoryBoard(_loop_time)
        leaver = asyncio.ensure_future(_meet(board, c, window_s=2.0, confirm_s=5.0))
        stays = asyncio.gather(*(_meet(board, p, window_s=2.0, confirm_s=5.0) for p in (a, b)))
        await asyncio.sleep(1.0)
        leaver.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaver
        return await stays, _loop_time()

    (group_a, group_b), ended = run_virtual(main())
    assert isinstance(group_a, Group) and group_a == group_b
    assert {p.peer for p in group_a.members} == {a.peer, b.peer}
    assert ended < 3.0  # the 2 s window and a few polls, not + 5 s of confirmation wait


def test_a_peer_cancelled_after_confirming_leaves_the_word_to_its_caller():
    # Once its confirmation may have been read, a withdrawal would split the others' views
    # of the group (the caller sends its all-reduce Leave instead): nothing more is posted.
    a, b = _peers(2)

    async def main():
        board = MemoryBoard(_loop_time)
        confirmed = asyncio.Event()

        async def confirming_then_cancelled():
            return await find_group(
                board,
                b"k",
                a,
                expected_peers=3,
                estimator=FormationEstimator(FormationConfig(initial_s=1.0)),
                config=MatchConfig(poll_interval_s=0.25, confirm_timeout_s=5.0),
                clock=_loop_time,
                on_confirm=lambda group: confirmed.set(),
            )

        task = asyncio.ensure_future(confirming_then_cancelled())
        other = asyncio.ensure_future(_meet(board, b, window_s=1.0, expected=3))
        await confirmed.wait()
        await asyncio.sleep(0.1)  # its confirmation is on the board
        posted = dict(await board.confirmations(b"k"))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await other
        return posted, await board.confirmations(b"k")

    before, after = run_virtual(main())
    # (a group id may end in a zero byte: a withdrawal is the nonce and one zero byte only)
    assert before[a.peer] == after[a.peer] and after[a.peer] != a.nonce + b"\0"


def test_a_window_learned_from_fast_fills_still_waits_its_minimum_for_a_late_peer():
    # Peers used to arrive together, so the estimator shrank the window to its floor; a
    # peer slowed by load arrives 3 s late. The caller's minimum (a share of the round
    # period) keeps the window open for it instead of splitting the round.
    a, b, late = _peers(3)

    async def main(min_window_s):
        board = MemoryBoard(_loop_time)

        async def meet(p, start_at=0.0):
            await asyncio.sleep(start_at)
            est = FormationEstimator(FormationConfig(initial_s=1.0, floor_s=1.0))
            for _ in range(20):
                est.observe(0.05)
            return await find_group(
                board,
                b"k",
                p,
                expected_peers=3,
                estimator=est,
                config=MatchConfig(poll_interval_s=0.25, confirm_timeout_s=2.0),
                clock=_loop_time,
                min_window_s=min_window_s,
            )

        return await asyncio.gather(meet(a), meet(b), meet(late, start_at=3.0))

    without = run_virtual(main(0.0))
    assert isinstance(without[0], Group) and len(without[0].members) == 2
    assert isinstance(without[2], NoGroup)
    with_minimum = run_virtual(main(5.0))
    assert all(isinstance(g, Group) and len(g.members) == 3 for g in with_minimum)
    assert len({g.group_id for g in with_minimum}) == 1


def test_a_window_that_runs_out_closes_the_windows_still_open():
    # Both expect a third peer that never comes (it is on another key). a's window is 5 s,
    # b's 10 s: b closed after a had given up on it, and both lost the round; then
    # windows grew (each run-out is learned) and the pair kept missing each other.
    a, b = _peers(2)

    async def main():
        board = MemoryBoard(_loop_time)
        groups = await asyncio.gather(
            _meet(board, a, window_s=5.0, expected=3, confirm_s=2.0),
            _meet(board, b, window_s=10.0, expected=3, start_at=0.2, confirm_s=2.0),
        )
        return groups, _loop_time()

    (group_a, group_b), ended = run_virtual(main())
    assert isinstance(group_a, Group) and isinstance(group_b, Group)
    assert group_a.group_id == group_b.group_id and len(group_a.members) == 2
    assert ended < 5.0 + 1.0  # b closed at its next read after a's window ran out


def test_a_closed_mark_of_an_earlier_attempt_does_not_close_the_next_window():
    # b's entry from an earlier attempt under the same key, closed, is still on the board:
    # a closed its window at its first read on that nonce, and nobody confirmed with it.
    a, b = _peers(2)

    async def main():
        board = MemoryBoard(_loop_time)
        old = replace(b, expected=3, nonce=b"o" * 8, closed=True)
        await board.announce(b"k", old, expires_at=30.0)
        return await asyncio.gather(
            _meet(board, a, window_s=2.0, expected=3, confirm_s=2.0),
            _meet(board, b, window_s=2.0, expected=3, start_at=0.5, confirm_s=2.0),
        )

    group_a, group_b = run_virtual(main())
    assert isinstance(group_a, Group) and isinstance(group_b, Group)
    assert group_a.group_id == group_b.group_id


def test_an_entry_whose_attempt_withdrew_does_not_close_a_later_window():
    # a tries alone and withdraws, but its entry lives on (until its next window would
    # close). b, arriving later, closed its window at once on it, failed to confirm, and
    # its own withdrawn entry then did the same to a's next try: they never met.
    a, b = _peers(2)

    async def main():
        board = MemoryBoard(_loop_time)
        first = asyncio.ensure_future(_meet(board, a, window_s=5.0, expected=2))
        later = asyncio.ensure_future(_meet(board, b, window_s=5.0, expected=2, start_at=6.0))
        alone = await first
        again = await _meet(board, a, window_s=5.0, expected=2, start_at=10.0 - _loop_time())
        return alone, await later, again

    alone, b_group, a_group = run_virtual(main())
    assert alone == NoGroup("no group formed: no other peer was ready for this round")
    assert isinstance(b_group, Group) and b_group == a_group
    assert {p.peer for p in b_group.members} == {a.peer, b.peer}


def test_a_window_held_open_past_a_withdrawn_entry_is_not_learned_as_a_fill_time():
    # b's count (2) is reached by a's withdrawn entry, so b waits out its window; it must
    # not be observed as a window that filled, or the windows grow (to 15 s here).
    a, b = _peers(2)
    observed: list[float] = []

    class Noting(FormationEstimator):
        def observe(self, fill_time_s: float) -> None:
            observed.append(fill_time_s)
            super().observe(fill_time_s)

    async def main():
        board = MemoryBoard(_loop_time)
        await _meet(board, a, window_s=5.0, expected=2)  # alone: withdraws
        est = Noting(FormationConfig(initial_s=5.0))
        outcome = await _meet(board, b, window_s=5.0, expected=2, est=est)
        return outcome, est.window_s()

    outcome, window = run_virtual(main())
    assert isinstance(outcome, NoGroup) and observed == [] and window == 5.0


def test_a_peer_with_a_lagging_view_neither_splits_the_others_nor_loses_its_seat():
    # 80 ready peers arrive 0.1 s apart, groups of at most 64. One has a lagging view
    # (expects 2). It used to wait for one group's worth (64), close first, and post a
    # closed mark that closed everyone else's window on boards of 64 to 80 entries: 14
    # groups of 2 to 9 members that matched no one's. Now it waits for the median count
    # (80) like the others, and everyone is seated.
    n = 80

    async def main():
        board = MemoryBoard(_loop_time)
        config = MatchConfig(max_group_size=64, poll_interval_s=0.25)

        async def one(i):
            await asyncio.sleep(0.1 * i)
            me = ReadyPeer(bytes([i]) * 32, 1.0, 1e8, False, f"h{i}:1")
            return await find_group(
                board,
                b"k",
                me,
                expected_peers=2 if i == 0 else n,
                estimator=FormationEstimator(FormationConfig(initial_s=15.0, floor_s=3.0)),
                config=config,
                clock=_loop_time,
            )

        return await asyncio.gather(*(one(i) for i in range(n)))

    outcomes = run_virtual(main())
    assert all(isinstance(o, Group) for o in outcomes)
    groups = {o.group_id: o for o in outcomes}
    assert sorted(len(g.members) for g in groups.values()) == [40, 40]


def test_one_entry_claiming_a_huge_count_does_not_hold_the_window_open():
    # With the largest count waited for (up to one group), one such entry held every
    # window of a smaller swarm open to its end, round after round.
    peers = _peers(4)
    greedy = ReadyPeer(b"\x09" * 32, 1.0, 1e8, expected=65_536)

    async def main():
        board = MemoryBoard(_loop_time)
        await board.announce(b"k", greedy, expires_at=100.0)
        await board.confirm(b"k", greedy.peer, b"x" * 16, expires_at=100.0)
        groups = await asyncio.gather(
            *(_meet(board, p, window_s=15.0, expected=5, max_group=8) for p in peers)
        )
        return groups, _loop_time()

    groups, ended = run_virtual(main())
    assert ended < 1.0  # the 4 and the greedy entry are the 5 expected
    assert all(g == groups[0] for g in groups) and len(groups[0].members) == 4
