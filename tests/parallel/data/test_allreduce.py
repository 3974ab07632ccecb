"""The all-reduce round over the in-memory network, with faults injected at exact points.

The invariant checked after every round, for every member: either the round succeeded and
EVERY element equals the weighted mean over exactly the reported contributors, or it failed
and the member's tensors are untouched. Inputs are random and distinct per member, so a
part averaged over a different set would differ by far more than the tolerance.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import replace
from unittest import mock

import pytest
import torch

from shoal.errors import PeerUnavailable
from shoal.parallel.data.aggregate import AggregationConfig
from shoal.parallel.data.allreduce import AllReduceConfig, RoundStatus
from shoal.parallel.data.averager import Averager, GroupSpec
from shoal.parallel.data.memory import Fault, MemoryNetwork, PeerKilled
from shoal.parallel.data.messages import Contribution, Leave, Reduced, Report

SIZE = 1001  # not divisible by the group size: parts differ in length


def _inputs(members, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(SIZE, generator=g) * (i + 1) for i, m in enumerate(members)}


def _split(vector):
    # Two tensors that are not views of one buffer: exercises the copy path.
    return [vector[:300].clone().view(10, 30), vector[300:].clone()]


def _expected(inputs, weights, contributors):
    total = sum(weights[m] for m in contributors)
    return sum(inputs[m].double() * weights[m] for m in contributors) / total


async def _round(
    members,
    *,
    faults=(),
    weights=None,
    inputs=None,
    group=None,
    codec="none",
    # A member that waits for a dead peer reaches the collect deadline, and then has 10% of
    # this budget to get its report out: 0.1 s was less than a loop stall in a full CI run.
    timeout_s=3.0,
    late=(),
    config=None,
    unreachable=(),
    slow=None,
    tags=None,
    rewrite=None,
    check_tag=None,
):
    net = MemoryNetwork(faults)
    if rewrite is not None:  # rewrite(sender, to, message) -> what is delivered instead
        send = net._send

        async def rewritten(sender, to, message):
            return await send(sender, to, rewrite(sender, to, message))

        net._send = rewritten
    net.unreachable.update(unreachable)
    net.slow.update(slow or {})
    inputs = inputs or _inputs(members)
    weights = weights or {m: float(i + 1) for i, m in enumerate(members)}
    group = group or GroupSpec.uniform(b"round-1", members)
    tensors = {m: _split(inputs[m]) for m in members}
    averagers = {m: Averager(net.transport(m), wire_codec=codec, config=config) for m in members}

    async def run(m):
        try:
            return await averagers[m].average(
                tensors[m],
                weights[m],
                group=group,
                timeout_s=timeout_s,
                tag=(tags or {}).get(m, b""),
                check_tag=check_tag,
            )
        except (PeerKilled, asyncio.CancelledError):  # killed, or stopped by a stop fault
            return None

    on_time = [m for m in members if m not in late]
    tasks = {m: asyncio.ensure_future(run(m)) for m in on_time}
    if late:
        # Start the stragglers only once every punctual reducer has sent all its reports.
        n_reports = len(on_time) * (len(members) - 1)

        async def reports_out():
            while sum(net.sent[(m, "Report")] for m in on_time) < n_reports:
                net.delivered.clear()
                await net.delivered.wait()

        await asyncio.wait_for(reports_out(), timeout_s)
        tasks.update({m: asyncio.ensure_future(run(m)) for m in late})
    results = {m: await t for m, t in tasks.items()}
    outputs = {m: torch.cat([t.reshape(-1) for t in tensors[m]]) for m in members}
    return net, inputs, weights, results, outputs


def _check_invariant(inputs, weights, results, outputs, atol=1e-5):
    for m, result in results.items():
        if result is None:  # killed
            continue
        if result.ok:
            assert result.contributors, m
            expect = _expected(inputs, weights, result.contributors)
            assert torch.allclose(outputs[m].double(), expect, atol=atol, rtol=0), m
            assert result.weight == pytest.approx(sum(weights[p] for p in result.contributors))
        else:
            assert result.reason
            assert torch.equal(outputs[m], inputs[m]), f"{m} failed but its tensors changed"


def _ok(results):
    return {m for m, r in results.items() if r is not None and r.ok}


def test_healthy_round_averages_everyone_with_weights():
    members = ["a", "b", "c", "d"]
    _, inputs, weights, results, outputs = asyncio.run(_round(members))
    assert _ok(results) == set(members)
    assert all(r.contributors == frozenset(members) for r in results.values())
    _check_invariant(inputs, weights, results, outputs)
    assert all(torch.equal(outputs["a"], outputs[m]) for m in members)


def test_client_mode_member_contributes_without_reducing():
    members = ["a", "b", "c", "client"]
    group = GroupSpec(b"r", tuple(members), (1e8, 3e8, 1e8, 1e9), (False, False, False, True))
    net, inputs, weights, results, outputs = asyncio.run(_round(members, group=group))
    assert _ok(results) == set(members)
    assert results["client"].contributors == frozenset(members)
    assert net.sent[("client", "Report")] == 0  # it reduced nothing
    _check_invariant(inputs, weights, results, outputs)


def _tagged_round(weights=None, inputs=None, **kwargs):
    """a and b carry one group's mean (tag g1), c and d another's (g2), e its own vector."""
    members = ["a", "b", "c", "d", "e"]
    if inputs is None:
        inputs = _inputs(members)
        inputs["b"], inputs["d"] = inputs["a"].clone(), inputs["c"].clone()
    weights = weights or {"a": 6.0, "b": 6.0, "c": 4.0, "d": 4.0, "e": 1.0}
    tags = {"a": b"g1", "b": b"g1", "c": b"g2", "d": b"g2"}
    return _round(members, inputs=inputs, weights=weights, tags=tags, **kwargs)


def test_members_sending_one_tag_count_once():
    _, inputs, weights, results, outputs = asyncio.run(_tagged_round())
    assert _ok(results) == set(inputs)
    expect = _expected(inputs, weights, ["a", "c", "e"])
    for m, result in results.items():
        assert result.contributors == frozenset(inputs)
        assert result.weight == 11.0  # 6 + 4 + 1: each group's weight once
        assert result.tags == {"a": b"g1", "b": b"g1", "c": b"g2", "d": b"g2"}
        assert torch.allclose(outputs[m].double(), expect, atol=1e-5, rtol=0), m
        assert torch.equal(outputs[m], outputs["a"])


def test_a_tagged_member_lost_mid_round_leaves_its_tags_weight_whole():
    fault = Fault("b", "Contribution", 2)  # reached a and c only: b is left out everywhere
    _, inputs, weights, results, outputs = asyncio.run(_tagged_round(faults=[fault]))
    assert _ok(results) == {"a", "c", "d", "e"}
    expect = _expected(inputs, weights, ["a", "c", "e"])
    for m in ("a", "c", "d", "e"):
        assert "b" not in results[m].contributors
        assert results[m].weight == 11.0  # a still brings g1's whole weight
        assert torch.allclose(outputs[m].double(), expect, atol=1e-5, rtol=0), m


def test_a_tag_that_check_tag_refuses_is_screened_out_at_every_reducer():
    # a belongs to group g1 but says it carries g2's mean: it would take g2's place.
    groups = {"a": b"g1", "b": b"g1", "c": b"g2", "d": b"g2"}

    def check_tag(sender, tag, weight):
        return None if groups.get(sender, b"") == tag else f"{sender} may not carry {tag!r}"

    members = ["a", "b", "c", "d", "e"]
    inputs = _inputs(members)
    inputs["b"], inputs["d"] = inputs["a"].clone(), inputs["c"].clone()
    inputs["a"] = torch.full_like(inputs["a"], 1000.0)
    weights = {"a": 6.0, "b": 6.0, "c": 4.0, "d": 4.0, "e": 1.0}
    tags = {**groups, "a": b"g2", "e": b""}
    groups["e"] = b""
    _, inputs, weights, results, outputs = asyncio.run(
        _round(members, inputs=inputs, weights=weights, tags=tags, check_tag=check_tag)
    )
    assert _ok(results) == set(members)
    expect = _expected(inputs, weights, ["b", "c", "e"])
    for m, result in results.items():
        assert "a" not in result.contributors and result.weight == 11.0
        assert torch.allclose(outputs[m].double(), expect, atol=1e-5, rtol=0), m
    assert "may not carry" in results["b"].screened["a"]  # seen first-hand by a reducer


def test_twins_under_one_tag_with_different_values_fail_the_round():
    members = ["a", "b", "c", "d", "e"]
    inputs = _inputs(members)
    inputs["d"] = inputs["c"].clone()  # but b is not a's twin
    tags = {"a": b"g1", "b": b"g1", "c": b"g2", "d": b"g2"}
    weights = {"a": 6.0, "b": 6.0, "c": 4.0, "d": 4.0, "e": 1.0}
    _, inputs, _, results, outputs = asyncio.run(
        _round(members, inputs=inputs, weights=weights, tags=tags)
    )
    assert not _ok(results)
    assert any("contributions under one tag differ" in r.reason for r in results.values())
    for m in members:
        assert torch.equal(outputs[m], inputs[m])


@pytest.mark.parametrize("lie", ["passes as a twin", "keeps weights and values"])
def test_a_member_telling_reducers_different_tags_fails_the_round(lie):
    if lie == "passes as a twin":  # e passes itself off as group g1 to reducer a only
        liar, reducer, tag, weights, why = "e", "a", b"g1", None, "under one tag differ"
        inputs = None
    else:
        # a says g2 to reducer e: there a and b count where a and c count elsewhere. With
        # equal weights and values only the tags tell the parts apart.
        liar, reducer, tag, why = "a", "e", b"g2", "reducers saw different contributor tags"
        weights = dict.fromkeys("abcde", 1.0)
        inputs = dict.fromkeys("abcd", torch.randn(SIZE)) | {"e": torch.randn(SIZE)}

    def rewrite(sender, to, message):
        if sender == liar and to == reducer and isinstance(message, Contribution):
            return replace(message, tag=tag)
        return message

    kwargs = {"inputs": inputs} if inputs is not None else {}
    _, inputs, _, results, outputs = asyncio.run(_tagged_round(weights, rewrite=rewrite, **kwargs))
    assert not _ok(results)
    assert any(why in result.reason for result in results.values())
    for m in results:
        assert torch.equal(outputs[m], inputs[m])


@pytest.mark.parametrize("codec,atol", [("fp16", 2e-2), ("int8", 0.1), ("int4", 0.9)])
def test_wire_codecs_give_identical_results_close_to_the_mean(codec, atol):
    members = ["a", "b", "c"]
    _, inputs, weights, results, outputs = asyncio.run(_round(members, codec=codec))
    assert _ok(results) == set(members)
    _check_invariant(inputs, weights, results, outputs, atol=atol)
    assert all(torch.equal(outputs["a"], outputs[m]) for m in members)


@pytest.mark.parametrize("stride", [5, 8])  # the means fill 3/5 (dense) or 3/8 (sparse)
def test_sparse_wire_codec_gives_the_mean_of_sparse_inputs(stride, monkeypatch):
    from shoal.compress.sparse import SparseCodec

    layouts: list[tuple[str, int]] = []
    encode = SparseCodec.encode

    def recording(self, tensor, state=None):
        encoded = encode(self, tensor, state)
        layouts.append(("dense" if len(encoded.payload) == 1 else "sparse", tensor.numel()))
        return encoded

    monkeypatch.setattr(SparseCodec, "encode", recording)
    members = ["a", "b", "c"]
    inputs = _inputs(members)
    for i, m in enumerate(members):  # different supports: the means hold their union
        inputs[m][torch.arange(inputs[m].numel()) % stride != i] = 0.0
    _, inputs, weights, results, outputs = asyncio.run(
        _round(members, inputs=inputs, codec="sparse")
    )
    assert _ok(results) == set(members)
    _check_invariant(inputs, weights, results, outputs)
    assert all(torch.equal(outputs["a"], outputs[m]) for m in members)
    # 9 contributions (3 parts each), sparse; 3 results, as full as the union of supports
    kinds = sorted(kind for kind, _ in layouts)
    assert kinds == (["dense"] * 3 + ["sparse"] * 9 if stride == 5 else ["sparse"] * 12)


def test_peer_dead_before_sending_is_left_out_and_its_part_is_reassigned():
    members = ["a", "b", "c", "d"]
    fault = Fault("c", "Contribution", 0)
    net, inputs, weights, results, outputs = asyncio.run(_round(members, faults=[fault]))
    assert net.fired == [fault] and results["c"] is None
    assert _ok(results) == {"a", "b", "d"}
    for m in ("a", "b", "d"):
        assert results[m].contributors == frozenset({"a", "b", "d"})
        assert results[m].reassigned == {2: "a"}
        assert "c" in results[m].excluded
    _check_invariant(inputs, weights, results, outputs)


def test_peer_dead_mid_reduce_scatter_is_left_out_everywhere():
    members = ["a", "b", "c", "d"]
    fault = Fault("c", "Contribution", 2)  # reached a and b, never d
    net, inputs, weights, results, outputs = asyncio.run(_round(members, faults=[fault]))
    assert net.fired == [fault]
    assert _ok(results) == {"a", "b", "d"}
    # a and b received c's part, yet re-reduce over the agreed set without it.
    assert all(results[m].contributors == frozenset({"a", "b", "d"}) for m in _ok(results))
    _check_invariant(inputs, weights, results, outputs)


def test_a_member_no_one_can_reach_is_left_out_and_the_others_average():
    # d reaches everyone, but no one reaches d (its address is refused, or a NAT): its
    # report accepts only itself. Intersected with the others', it failed every member's
    # round; its part is now reassigned as a dead reducer's would be.
    members = ["a", "b", "c", "d"]
    config = AllReduceConfig(min_contributors=2)
    _, inputs, weights, results, outputs = asyncio.run(
        _round(members, unreachable={"d"}, config=config, timeout_s=2.0)
    )
    assert _ok(results) == {"a", "b", "c"}
    for m in ("a", "b", "c"):
        assert results[m].contributors == frozenset({"a", "b", "c"})
        assert results[m].reassigned == {3: "a"}
        assert results[m].excluded["d"] == "its reducer heard from 1 of 4 members (cut off)"
    assert "fewer than 2" in results["d"].reason  # it heard from no one
    _check_invariant(inputs, weights, results, outputs)


def test_a_cut_off_reducer_is_said_to_be_cut_off_before_what_a_reducer_said_of_it():
    # As above, and d's upload to a outlasts a's collect deadline: a reports d late. The
    # cut is why d is out of every part, so its reason comes first.
    members = ["a", "b", "c", "d"]
    config = AllReduceConfig(min_contributors=2)
    _, inputs, weights, results, outputs = asyncio.run(
        _round(members, unreachable={"d"}, slow={("d", 0): 1.5}, config=config, timeout_s=2.0)
    )
    assert _ok(results) == {"a", "b", "c"}
    for m in ("a", "b", "c"):
        assert results[m].contributors == frozenset({"a", "b", "c"})
        assert results[m].excluded["d"] == (
            "its reducer heard from 1 of 4 members (cut off); late for the collect deadline"
        )
    _check_invariant(inputs, weights, results, outputs)


def _blocked_round(leave: bool):
    """Reducers a-d, clients w-z; c and the clients cannot reach d (a and b can). With
    ``leave``, each client stops right after its uploads, as a peer shutting down does."""
    members = ["a", "b", "c", "d", "w", "x", "y", "z"]
    clients = {"w", "x", "y", "z"}

    class Blocked(MemoryNetwork):
        async def _send(self, sender, to, message):
            if to == "d" and sender in clients | {"c"} and isinstance(message, Contribution):
                if leave and sender in clients:
                    asyncio.get_running_loop().call_soon(self.rounds[sender].cancel)
                raise PeerUnavailable("cannot reach d", peer="d")
            return await super()._send(sender, to, message)

    async def main():
        net = Blocked()
        spec = GroupSpec(b"rb", tuple(members), (1e8,) * 8, tuple(m in clients for m in members))
        inputs = _inputs(members)
        tensors = {m: _split(inputs[m]) for m in members}
        config = AllReduceConfig(min_contributors=2)
        averagers = {m: Averager(net.transport(m), config=config) for m in members}

        async def run(m):
            try:
                return await averagers[m].average(tensors[m], 1.0, group=spec, timeout_s=2.0)
            except asyncio.CancelledError:
                return None

        results = dict(zip(members, await asyncio.gather(*map(run, members)), strict=True))
        outputs = {m: torch.cat([t.reshape(-1) for t in tensors[m]]) for m in members}
        return inputs, {m: 1.0 for m in members}, results, outputs

    return asyncio.run(main())


def test_a_reducer_most_members_cannot_reach_is_cut_off_and_the_rest_average():
    inputs, weights, results, outputs = _blocked_round(leave=False)
    everyone_but_d = frozenset("abcwxyz")
    assert _ok(results) == set("abcdwxyz")  # d still receives: it takes the others' mean
    for m in "abcdwxyz":
        assert results[m].contributors == everyone_but_d  # not {a, b, d}: 7 of 8, not 3
        assert results[m].reassigned == {3: "a"}
    _check_invariant(inputs, weights, results, outputs)


def test_no_cut_is_made_that_would_need_members_that_left():
    # The clients' slices of d's part would have to be sent again to a substitute, and they
    # are gone: the round goes on over what every reducer kept, as without the rule.
    inputs, weights, results, outputs = _blocked_round(leave=True)
    assert _ok(results) == {"a", "b", "c", "d"}
    for m in "abcd":
        assert results[m].contributors == frozenset("abd") and results[m].reassigned == {}
    _check_invariant(inputs, weights, results, outputs)


@pytest.mark.parametrize("reducer_late_s", [0.0, 0.02])
def test_a_reducer_whose_senders_are_slow_is_not_cut_off(reducer_late_s):
    # A's part is large and the clients' uploads of it outlast the collect deadline: they
    # were on their way, so A heard from them. Cutting A would have them upload it again to
    # a substitute within the repair phase, and fail the round for everyone.
    members = ["A", "B", "c1", "c2", "c3", "c4"]
    clients = {"c1", "c2", "c3", "c4"}
    spec = GroupSpec(
        b"rs", tuple(members), (1e9,) + (1e8,) * 5, tuple(m in clients for m in members)
    )
    net = MemoryNetwork()
    net.slow.update({(c, 0): 1.4 for c in clients})

    async def main():
        inputs = _inputs(members)
        tensors = {m: _split(inputs[m]) for m in members}
        config = AllReduceConfig(min_contributors=2)
        averagers = {m: Averager(net.transport(m), config=config) for m in members}

        async def run(m):
            if m == "A":  # starting later, A reads its inbox after the senders gave up
                await asyncio.sleep(reducer_late_s)
            return await averagers[m].average(tensors[m], 1.0, group=spec, timeout_s=2.0)

        results = dict(zip(members, await asyncio.gather(*map(run, members)), strict=True))
        return inputs, results, {m: torch.cat([t.reshape(-1) for t in tensors[m]]) for m in members}

    inputs, results, outputs = asyncio.run(main())
    assert _ok(results) == set(members)
    for m in members:
        assert results[m].contributors == frozenset({"A", "B"}) and results[m].reassigned == {}
        assert results[m].excluded["c1"] == "late for the collect deadline"
    _check_invariant(inputs, {m: 1.0 for m in members}, results, outputs)


def test_a_report_for_a_clients_empty_part_is_ignored():
    members = ["a", "b", "c", "client"]
    spec = GroupSpec(b"rc", tuple(members), (1e8,) * 4, (False, False, False, True))
    net = MemoryNetwork()

    async def main():
        for m in members:  # waiting in every inbox before the round opens
            net.transport(m).inbox.deliver(Report(b"rc", "client", 3, frozenset({"client"})))
        inputs = _inputs(members)
        tensors = {m: _split(inputs[m]) for m in members}
        averagers = {m: Averager(net.transport(m)) for m in members}
        runs = [averagers[m].average(tensors[m], 1.0, group=spec, timeout_s=1.0) for m in members]
        return dict(zip(members, await asyncio.gather(*runs), strict=True))

    results = asyncio.run(main())
    assert _ok(results) == set(members)
    assert all(
        r.contributors == frozenset(members) and r.reassigned == {} for r in results.values()
    )


def _report(sender, part, accepted, rejected=()):
    return Report(b"r", sender, part, frozenset(accepted), {m: "screened" for m in rejected})


def test_only_a_reducer_that_heard_from_few_is_cut_off_and_only_when_it_helps():
    from shoal.parallel.data.agreement import cut_off_reducers as _cut_off

    members = ["a", "b", "c", "d"]
    everyone = _report("a", 0, members)
    # d heard from itself only, the others from all four: d is cut off.
    reports = {j: _report(m, j, members) for j, m in enumerate("abc")} | {3: _report("d", 3, "d")}
    assert list(_cut_off(reports, members, silent=[])) == [3]
    # With b and c silent (presumed dead) as well, only a would be left either way.
    assert _cut_off({0: everyone, 3: reports[3]}, members, silent=[1, 2]) == {}
    # Half of the best is not fewer than half: d keeps its part (2 of 4 against 4).
    assert _cut_off({0: everyone, 3: _report("d", 3, ["c", "d"])}, members, []) == {}
    # Contributions refused by screening were heard: d refused garbage, it was not cut off.
    screened = _report("d", 3, ["d"], rejected=["a", "b", "c"])
    assert _cut_off({0: everyone, 3: screened}, members, []) == {}
    # Nor when the members it would keep include one that left (it sends no repair).
    assert _cut_off(reports, members, silent=[], gone={"b"}) == {}
    # Leaving d out must keep more contributors than keeping it: here a accepted d alone.
    assert (
        _cut_off(
            {0: _report("a", 0, ["d"], ["a", "b", "c"]), 3: _report("d", 3, ["d"])}, members, []
        )
        == {}
    )
    # A member that left counts on neither side, d itself included: keeping d would keep
    # {c, d} (2), cutting it keeps {a, c} (2), but d is gone, so keeping it keeps c alone.
    five = ["a", "b", "c", "d", "e"]
    narrow = {j: _report(m, j, "acd", rejected="be") for j, m in enumerate("abc")}
    narrow |= {3: _report("d", 3, "cd"), 4: _report("e", 4, "acd", rejected="be")}
    assert _cut_off(narrow, five, silent=[]) == {}
    assert list(_cut_off(narrow, five, silent=[], gone={"d"})) == [3]


def test_a_member_stopping_mid_reduce_scatter_is_left_out_without_waiting_for_it():
    # c stops (a clean shutdown) after its part reached a and b but not d: it says it
    # leaves, so d closes its collection and everyone stops waiting for c's report at once
    # instead of at the phase deadlines (collect at 0.55 x 30 s).
    members = ["a", "b", "c", "d"]
    fault = Fault("c", "Contribution", 2, stop=True)
    start = time.monotonic()
    net, inputs, weights, results, outputs = asyncio.run(
        _round(members, faults=[fault], timeout_s=30.0)
    )
    took = time.monotonic() - start
    assert net.fired == [fault] and results["c"] is None
    assert net.sent[("c", "Leave")] == 3  # told every other member
    assert _ok(results) == {"a", "b", "d"}
    for m in ("a", "b", "d"):
        assert results[m].contributors == frozenset({"a", "b", "d"})
        assert results[m].excluded["c"] == "left the round"
        assert results[m].reassigned == {2: "a"}
    _check_invariant(inputs, weights, results, outputs)
    assert took < 5.0, f"the others waited {took:.1f} s for a member that had left"


def test_a_member_stopped_while_planning_its_shares_says_it_leaves():
    # Shares are planned on a worker thread before the round starts, and the others may
    # already count on this member: stopped there, it must leave like anywhere else.
    async def main() -> MemoryNetwork:
        net = MemoryNetwork([])
        group = GroupSpec.uniform(b"r", ["a", "b", "c"])
        entered, gate = threading.Event(), threading.Event()

        def slow_shares(self: GroupSpec) -> list[float]:
            entered.set()
            gate.wait(10.0)
            return [1 / 3] * 3

        with mock.patch.object(GroupSpec, "shares", slow_shares):
            averager = Averager(net.transport("a"))
            averager.prepare(group)
            task = asyncio.ensure_future(
                averager.average([torch.zeros(6)], 1.0, group=group, timeout_s=5.0)
            )
            assert await asyncio.to_thread(entered.wait, 5.0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            gate.set()
        assert not net.transport("a").inbox.is_open(b"r")
        return net

    assert asyncio.run(main()).sent[("a", "Leave")] == 2


def test_a_reducer_stopping_before_its_result_fails_the_round_at_once():
    # c reported, then stopped before sending its reduced part: the others cannot complete
    # (a reducer gone after its report) and fail on its leave, not at the 30 s deadline.
    members = ["a", "b", "c", "d"]
    fault = Fault("c", "Reduced", 0, stop=True)
    start = time.monotonic()
    net, inputs, weights, results, outputs = asyncio.run(
        _round(members, faults=[fault], timeout_s=30.0)
    )
    took = time.monotonic() - start
    assert net.fired == [fault]
    for m in ("a", "b", "d"):
        assert not results[m].ok
        assert results[m].reason == "parts [2] missing: their reducer left the round"
    _check_invariant(inputs, weights, results, outputs)
    assert took < 5.0


def test_a_member_stopping_during_the_repair_fails_the_round_at_once():
    # c stops before reporting (its part goes to a), then the client d stops before
    # sending a its raw part of c's part: a cannot reduce that part over the agreed set
    # {a, b, d}. It says so by leaving, and b fails at once; it waited out the 30 s round
    # for a part nobody could send (d has no part of its own whose absence would tell).
    members = ["a", "b", "c", "d"]
    group = GroupSpec(b"r", tuple(members), (1e8,) * 4, (False, False, False, True))
    dead = Fault("c", "Report", 0, stop=True)
    stop = Fault("d", "Contribution", 3, stop=True)  # 0-2 went to a, b and c
    start = time.monotonic()
    net, inputs, weights, results, outputs = asyncio.run(
        _round(members, faults=[dead, stop], group=group, timeout_s=30.0)
    )
    took = time.monotonic() - start
    assert net.fired == [dead, stop] and results["c"] is None and results["d"] is None
    assert not results["a"].ok and "part 2 lacks the raw parts of 1" in results["a"].reason
    assert not results["b"].ok and "their reducer left the round" in results["b"].reason
    assert net.sent[("a", "Leave")] == 3
    _check_invariant(inputs, weights, results, outputs)
    assert took < 5.0, f"the others waited {took:.1f} s for a part nobody could reduce"


def test_a_member_cancelled_while_it_leaves_does_not_leave_twice():
    members = ["a", "b", "c", "d"]
    group = GroupSpec(b"r", tuple(members), (1e8,) * 4, (False, False, False, True))
    faults = [
        Fault("c", "Report", 0, stop=True),
        Fault("d", "Contribution", 3, stop=True),  # a cannot reduce c's part: it leaves
        Fault("a", "Leave", 1, stop=True),  # and is cancelled while it says so
    ]
    net, *_ = asyncio.run(_round(members, faults=faults, group=group, timeout_s=30.0))
    assert net.fired == faults
    assert net.sent[("a", "Leave")] <= 3  # one per other member, not a second round of them


def test_reducer_dead_before_all_gather_fails_the_round_cleanly():
    members = ["a", "b", "c", "d"]
    fault = Fault("c", "Reduced", 0)
    net, inputs, weights, results, outputs = asyncio.run(
        _round(members, faults=[fault], timeout_s=0.6)
    )
    assert net.fired == [fault]
    for m in ("a", "b", "d"):
        assert results[m].status is RoundStatus.FAILED
        assert "[2]" in results[m].reason
    _check_invariant(inputs, weights, results, outputs)


def test_reducer_dead_mid_report_never_yields_a_mix():
    # c's report reaches a only: a and the others disagree on the contributor set.
    members = ["a", "b", "c", "d"]
    fault = Fault("c", "Report", 1)
    net, inputs, weights, results, outputs = asyncio.run(
        _round(members, faults=[fault], timeout_s=0.6)
    )
    assert net.fired == [fault]
    assert all(not r.ok for m, r in results.items() if r is not None)
    _check_invariant(inputs, weights, results, outputs)


def test_straggler_past_the_collect_deadline_is_left_out():
    members = ["a", "b", "c", "d"]
    _net, inputs, weights, results, outputs = asyncio.run(
        _round(members, late=["d"], timeout_s=3.0)
    )
    assert {"a", "b", "c"} <= _ok(results)
    for m in ("a", "b", "c"):
        assert results[m].contributors == frozenset({"a", "b", "c"})
        assert "d" in results[m].excluded
    _check_invariant(inputs, weights, results, outputs)


def test_nan_and_huge_contributions_are_excluded_and_reported():
    members = ["a", "b", "c", "d", "e"]
    inputs = _inputs(members)
    inputs["b"] = inputs["b"].clone()
    inputs["b"][17] = float("nan")
    inputs["e"] = inputs["e"] * 1e9
    _, inputs, weights, results, outputs = asyncio.run(_round(members, inputs=inputs))
    for m in ("a", "c", "d"):
        assert results[m].ok and results[m].contributors == frozenset({"a", "c", "d"})
        assert results[m].excluded["b"] == "not finite"
        assert "e" in results[m].excluded
    # What each reducer refused itself: e everywhere, b only where its NaN fell (part 0).
    assert all(results[m].screened["e"].startswith("rms") for m in "acd")
    assert {m for m in "acde" if "b" in results[m].screened} == {"a"}
    assert results["a"].screened["b"] == "not finite"
    _check_invariant(inputs, weights, results, outputs)


def test_absurd_weights_are_excluded_and_reported():
    # Two 1e308 weights overflowed the total to inf: an all-zero "mean" reported as ok.
    members = ["a", "b", "c", "d"]
    weights = {"a": 1.0, "b": 1e308, "c": 1e308, "d": 2.0}
    _, inputs, weights, results, outputs = asyncio.run(_round(members, weights=weights))
    for m in ("a", "d"):
        assert results[m].ok and results[m].contributors == frozenset({"a", "d"})
        assert results[m].excluded["b"] == "weight 1e+308 is not in (0, 2**53]"
    _check_invariant(inputs, weights, results, outputs)


@pytest.mark.parametrize("kind", ["trimmed_mean", "centered_clip"])
def test_a_reducer_rejecting_all_but_a_pair_fails_a_robust_round_instead_of_deciding_it(kind):
    # M's report "rejects" b, c and d, so the agreed set was {a, M}: a robust rule of a
    # pair is their mean, and M's -200 took every member's result to -99.5.
    members = ["a", "b", "c", "d", "M"]

    class Lying(MemoryNetwork):
        async def _send(self, sender, to, message):
            if sender == "M" and isinstance(message, Report):
                screened = {m: "norm 9 > 1000 x median" for m in "bcd"}
                message = replace(message, accepted=frozenset({"a", "M"}), rejected=screened)
            return await super()._send(sender, to, message)

    async def main():
        net = Lying()
        group = GroupSpec.uniform(b"rl", members)
        inputs = {m: torch.ones(SIZE) for m in "abcd"} | {"M": torch.full((SIZE,), -200.0)}
        tensors = {m: _split(inputs[m]) for m in members}
        config = AllReduceConfig(min_contributors=2, aggregation=AggregationConfig(kind=kind))
        averagers = {m: Averager(net.transport(m), config=config) for m in members}
        runs = [averagers[m].average(tensors[m], 1.0, group=group, timeout_s=2.0) for m in members]
        results = dict(zip(members, await asyncio.gather(*runs), strict=True))
        outputs = {m: torch.cat([t.reshape(-1) for t in tensors[m]]) for m in members}
        return inputs, results, outputs

    inputs, results, outputs = asyncio.run(main())
    assert _ok(results) == set()
    honest = {m: r.reason for m, r in results.items() if m != "M"}
    assert all(results[m].screened == {} for m in honest)  # M's claims are not evidence
    assert {m: why for m, why in honest.items() if "fewer than 3" not in why} == {}
    _check_invariant(inputs, {m: 1.0 for m in members}, results, outputs)


def test_raw_values_in_an_encoded_round_and_large_finite_results():
    from shoal.compress import Fp16Codec
    from shoal.parallel.data.decoding import decode as _decode
    from shoal.parallel.data.decoding import decode_result as _decode_result

    # Raw fp32 in an fp16 round would carry values past fp16's range.
    with pytest.raises(ValueError, match="raw data"):
        _decode(Fp16Codec(), torch.full((3,), 1e9))
    # Finite values whose fp32 sum overflows are a result like any other.
    assert torch.equal(_decode_result(None, torch.full((4,), 1e38)), torch.full((4,), 1e38))
    with pytest.raises(ValueError, match="not finite"):
        _decode_result(None, torch.tensor([1.0, float("nan")]))


FAULT_MENU = [
    Fault("b", "Contribution", 0),
    Fault("b", "Contribution", 1),
    Fault("c", "Contribution", 2),
    Fault("b", "Report", 0),
    Fault("c", "Report", 2),
    Fault("d", "Reduced", 0),
    Fault("d", "Reduced", 2),
    # clean stops, which send leave messages on the way out
    Fault("b", "Report", 1, stop=True),
    Fault("c", "Contribution", 1, stop=True),
    Fault("d", "Reduced", 1, stop=True),
]


@pytest.mark.parametrize(
    "faults", [list(c) for c in itertools.combinations(FAULT_MENU, 2) if c[0].peer != c[1].peer]
)
def test_invariant_holds_under_double_faults(faults):
    members = ["a", "b", "c", "d"]
    # At least 2 contributors, as swarm rounds ask: on a loaded machine, messages can land
    # after these short deadlines, and members that presumed every other one dead each
    # "succeeded" alone with its own input (a partition in effect; the sets never mix).
    config = AllReduceConfig(
        collect_fraction=0.3, report_fraction=0.45, repair_fraction=0.7, min_contributors=2
    )
    _, inputs, weights, results, outputs = asyncio.run(
        _round(members, faults=faults, timeout_s=0.4, config=config)
    )
    _check_invariant(inputs, weights, results, outputs)
    # At most one contributor set is ever reported as a success.
    assert len({r.contributors for r in results.values() if r is not None and r.ok}) <= 1


class _Tampering:
    """Wraps a member's transport and rewrites some of its outgoing messages."""

    def __init__(self, inner, rewrite):
        self.inner, self.me, self.inbox, self.rewrite = inner, inner.me, inner.inbox, rewrite
        self.begin, self.end = inner.begin, inner.end

    async def send(self, to, message, timeout_s):
        await self.inner.send(to, self.rewrite(to, message), timeout_s)


def _tampered_round(members, tamperer, rewrite, inputs, weights):
    import dataclasses

    net = MemoryNetwork()
    group = GroupSpec.uniform(b"round-t", members)
    tensors = {m: _split(inputs[m]) for m in members}

    async def main():
        averagers = {}
        for m in members:
            t = net.transport(m)
            if m == tamperer:
                t = _Tampering(t, lambda to, msg: rewrite(dataclasses, to, msg))
            averagers[m] = Averager(t)
        tasks = [
            averagers[m].average(tensors[m], weights[m], group=group, timeout_s=1.0)
            for m in members
        ]
        return dict(zip(members, await asyncio.gather(*tasks), strict=True))

    results = asyncio.run(main())
    outputs = {m: torch.cat([t.reshape(-1) for t in tensors[m]]) for m in members}
    return results, outputs


def test_a_member_telling_reducers_different_weights_fails_the_round_not_a_mix():
    members = ["a", "b", "c"]
    inputs = _inputs(members)
    weights = {"a": 1.0, "b": 2.0, "c": 3.0}

    def rewrite(dc, to, msg):
        if isinstance(msg, Contribution) and to == "c":
            return dc.replace(msg, weight=50.0)
        return msg

    results, outputs = _tampered_round(members, "b", rewrite, inputs, weights)
    assert all(not r.ok for r in results.values())
    assert any("weights" in r.reason for r in results.values())
    _check_invariant(inputs, weights, results, outputs)


def test_reports_with_an_out_of_range_part_are_ignored():
    members = ["a", "b", "c"]
    inputs = _inputs(members)
    weights = {"a": 1.0, "b": 2.0, "c": 3.0}

    def rewrite(dc, to, msg):
        if isinstance(msg, Report):
            return dc.replace(msg, part=99)
        return msg

    results, outputs = _tampered_round(members, "b", rewrite, inputs, weights)
    # b's real report never arrives: b is presumed dead, the others average without it.
    for m in ("a", "c"):
        assert results[m].ok and results[m].contributors == frozenset({"a", "c"})
    _check_invariant(inputs, weights, results, outputs)


def test_a_reducer_with_another_wire_codec_fails_the_round_instead_of_raising():
    """An undecodable result part is a failed round with the reason, not an exception."""
    net = MemoryNetwork()
    members = ["a", "b"]
    group = GroupSpec.uniform(b"r", members)
    averagers = {
        "a": Averager(net.transport("a"), wire_codec="none"),
        "b": Averager(net.transport("b"), wire_codec="fp16"),
    }
    inputs = {m: torch.randn(1000) for m in members}
    before = inputs["a"].clone()

    async def main():
        return await asyncio.gather(
            *(averagers[m].average([inputs[m]], 1.0, group=group, timeout_s=5.0) for m in members)
        )

    a, b = asyncio.run(main())
    assert not a.ok and not b.ok
    # Each refuses the other's contribution: fp16 bytes without a codec, raw values in an
    # fp16 round (they would pass what fp16 bounds).
    assert "unreadable contribution" in a.reason and "unreadable contribution" in b.reason
    assert torch.equal(inputs["a"], before)  # a failed round leaves the tensors untouched


def test_a_reducer_sending_non_finite_results_fails_the_round_for_everyone_else():
    """Contributions are screened; results are checked too: a reducer's NaN never reaches
    another member's tensors."""
    members = ["a", "b", "c"]
    inputs = _inputs(members)
    weights = {"a": 1.0, "b": 2.0, "c": 3.0}

    def rewrite(dc, to, msg):
        if isinstance(msg, Reduced):
            data = msg.data.clone()
            data[3] = float("nan")
            return dc.replace(msg, data=data)
        return msg

    results, outputs = _tampered_round(members, "b", rewrite, inputs, weights)
    for m in ("a", "c"):
        assert not results[m].ok and "not finite" in results[m].reason
        # Seen first-hand, so held against b (an honest reducer checks its parts first).
        assert set(results[m].screened) == {"b"}, results[m].screened
        assert "reduced part 1 was unusable" in results[m].screened["b"]
    assert results["b"].screened == {}
    _check_invariant(inputs, weights, results, outputs)


def test_encoded_data_of_another_codec_is_refused_not_misread():
    """int8 bytes read as int4 nibbles would decode to finite garbage of the right size."""
    from shoal.compress import Int4BlockwiseCodec, Int8BlockwiseCodec
    from shoal.parallel.data.decoding import decode as _decode

    encoded = Int8BlockwiseCodec(256).encode(torch.randn(1000))
    with pytest.raises(ValueError, match="'int8'-encoded data, this round uses 'int4'"):
        _decode(Int4BlockwiseCodec(256), encoded)


def test_a_member_stopping_during_its_own_slow_upload_leaves_at_once():
    # c's upload to d crawls (a slow link, 4 s), and so does b's to c, so c is still
    # collecting when it stops: it must drop its upload and say it leaves at once, not
    # finish uploading first (which may take up to the collect deadline).
    from shoal.parallel.data.memory import MemoryTransport
    from shoal.parallel.data.transport import Inbox

    uploading = asyncio.Event()
    left_at: dict[str, float] = {}

    class SlowLink(MemoryTransport):
        async def send(self, to, message, timeout_s):
            if isinstance(message, Contribution) and (self.me, to) in (("c", "d"), ("b", "c")):
                if self.me == "c":
                    uploading.set()
                await asyncio.sleep(min(4.0, timeout_s))  # the link's speed, not a wait
            if isinstance(message, Leave):
                left_at.setdefault(self.me, time.monotonic())
            await super().send(to, message, timeout_s)

    async def main():
        members = ["a", "b", "c", "d"]
        net = MemoryNetwork()
        group = GroupSpec.uniform(b"round-slow", members)
        averagers = {}
        for m in members:
            inbox = net.inboxes.setdefault(m, Inbox())
            averagers[m] = Averager(SlowLink(net, m, inbox))
        tasks = {
            m: asyncio.ensure_future(
                averagers[m].average([torch.randn(SIZE)], 1.0, group=group, timeout_s=30.0)
            )
            for m in members
        }
        await asyncio.wait_for(uploading.wait(), 10.0)
        stopped_at = time.monotonic()
        tasks["c"].cancel()
        others = await asyncio.gather(*(tasks[m] for m in ("a", "b", "d")))
        return stopped_at, others

    stopped_at, others = asyncio.run(main())
    assert left_at["c"] - stopped_at < 2.0, "the leave waited for the slow upload"
    for result in others:
        assert result.ok and result.contributors == frozenset({"a", "b", "d"})


@pytest.mark.parametrize("tagged", [False, True])
def test_a_round_prepared_with_its_length_bounds_early_parts_by_their_sizes(tagged):
    # A column's round is prepared while its own group still averages: what members send
    # meanwhile must fit its parts (a round opened without sizes bounds nothing).
    net = MemoryNetwork()
    averager = Averager(net.transport("a"), wire_codec="int8")
    group = GroupSpec.uniform(b"col", ["a", "b", "c"])
    averager.prepare(group, 10_000, tagged=tagged)
    inbox = averager.transport.inbox
    sizes = [4096, 4096, 1808] if tagged else [3334, 3333, 3333]  # int8 blocks of 4096
    for part, size in enumerate(sizes):
        assert inbox.check(b"col", Contribution, "b", part, size) is None
        assert "values, not" in inbox.check(b"col", Contribution, "b", part, size + 1)
    assert "parts" in inbox.check(b"col", Contribution, "b", 3, 1)
