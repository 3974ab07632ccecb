"""Client-mode members that cannot accept connections: they pull their messages.

Four real runtimes in this process; the client's address is known to nobody, so any
attempt to dial it fails ("no address for member"). Its results must arrive over the
``Averaging/Pull`` streams it opens itself.
"""

from __future__ import annotations

import pytest
import torch

from shoal.net.config import NetConfig
from shoal.net.identity import Identity
from shoal.net.runtime import NetRuntime
from shoal.parallel.data.averager import Averager, GroupSpec
from shoal.parallel.data.grpc_transport import GrpcTransport

NUMEL = 50_003


@pytest.fixture
def swarm():
    """Three reducers that know each other, and a client that knows the reducers."""
    runtimes = [
        NetRuntime(Identity.generate(), NetConfig(port=0, unix_socket=False)).start()
        for _ in range(4)
    ]
    transports = [GrpcTransport(rt) for rt in runtimes]
    for t in transports:
        for rt in runtimes[:3]:
            t.set_address(rt.peer_id, rt.address)
    yield runtimes, transports
    for rt in runtimes:
        rt.close()


def _round(runtimes, transports, round_id, alive, codec="none", timeout_s=20.0):
    members = tuple(rt.peer_id for rt in runtimes)
    group = GroupSpec(round_id, members, (1e8,) * 4, (False, False, False, True))
    g = torch.Generator().manual_seed(len(round_id))
    inputs = [torch.randn(NUMEL, generator=g) * (i + 1) for i in range(4)]
    tensors = [x.clone() for x in inputs]
    futures = {
        i: runtimes[i].submit(
            Averager(transports[i], wire_codec=codec).average(
                [tensors[i]], float(i + 1), group=group, timeout_s=timeout_s
            )
        )
        for i in alive
    }
    results = {i: f.result(timeout_s + 10) for i, f in futures.items()}
    return members, inputs, tensors, results


@pytest.mark.parametrize("codec,atol", [("none", 1e-5), ("int8", 0.2)])
def test_an_unreachable_client_averages_by_pulling(swarm, codec, atol):
    runtimes, transports = swarm
    members, inputs, tensors, results = _round(runtimes, transports, b"pull-1", range(4), codec)
    expect = sum(inputs[j].double() * (j + 1) for j in range(4)) / 10
    for i, r in results.items():
        assert r.ok, (i, r.reason)
        assert r.contributors == frozenset(members)
        assert torch.allclose(tensors[i].double(), expect, atol=atol, rtol=0)
    assert all(torch.equal(tensors[0], t) for t in tensors[1:])  # identical everywhere
    assert runtimes[3].peer_id not in transports[0].addresses  # it was never dialed
    # Nothing is left attached once the round is over. A reducer may still hold one message
    # for the client: when the client ends its pull stream while the message's last frame is
    # going out, the reducer cannot tell whether it arrived and keeps it for a later pull
    # (until the round's deadline). What it wrote, its report and its result, it keeps until
    # then as well, in case the client's side of the stream had died.
    assert all(not t._pulls and not t._clients for t in transports)
    assert transports[3]._outbox.queued() == 0
    client = runtimes[3].peer_id
    for t in transports[:3]:
        kept = {key: len(slot.queue) for key, slot in t._outbox._slots.items() if slot.queue}
        assert set(kept) <= {(client, b"pull-1")} and sum(kept.values()) <= 1, kept
        assert set(t._outbox._slots) == {(client, b"pull-1")}
        assert t._outbox.queued() + t._outbox.unacknowledged() == 2


def test_a_client_still_averages_when_a_reducer_is_gone(swarm):
    runtimes, transports = swarm
    runtimes[1].close()  # its part is reassigned; the client pulls it from the substitute
    members, inputs, tensors, results = _round(
        runtimes, transports, b"pull-2", [0, 2, 3], timeout_s=4.0
    )
    live = [0, 2, 3]
    expect = sum(inputs[j].double() * (j + 1) for j in live) / sum(j + 1 for j in live)
    for i, r in results.items():
        assert r.ok, (i, r.reason)
        assert r.contributors == frozenset(members[j] for j in live)
        assert torch.allclose(tensors[i].double(), expect, atol=1e-5, rtol=0)


def test_a_client_that_never_pulls_does_not_hold_up_the_reducers(swarm):
    """Reducers post to a silent client and go on: their round ends long before the
    deadline; what they posted waits in the outbox until then."""
    runtimes, transports = swarm
    transports[3].begin = lambda *a: None  # a client that does not pull
    *_, results = _round(runtimes, transports, b"pull-3", range(4), timeout_s=12.0)
    assert not results[3].ok  # it never received the results
    for i in range(3):
        assert results[i].ok, results[i].reason
        assert sum(results[i].seconds.values()) < 6.0, results[i].seconds
    assert sum(t._outbox.queued() for t in transports[:3]) > 0  # held for the client


def test_only_the_client_members_of_a_begun_round_may_pull_it(swarm):
    from shoal.errors import NetworkError
    from shoal.net.proto.v1 import averaging_pb2 as pb

    runtimes, transports = swarm
    members = [rt.peer_id for rt in runtimes]
    loop_time = runtimes[0].run(_loop_time(), timeout_s=5.0)
    runtimes[0].run(
        _begin(transports[0], b"pull-4", members, {members[3]}, loop_time + 30.0), timeout_s=5.0
    )

    async def pull_once(t: GrpcTransport) -> str:
        stream = t._stub(members[0]).Pull(pb.PullRequest(round_id=b"pull-4"), timeout_s=0.5)
        try:
            async for _ in stream:
                return "message"
        except NetworkError as exc:
            return type(exc).__name__
        return "ended"

    # A reducer of the round may not read what is queued for the client ...
    assert runtimes[1].run(pull_once(transports[1]), timeout_s=10.0) == "ProtocolViolation"
    # ... the client may (nothing is queued: its stream ends at its deadline).
    assert runtimes[3].run(pull_once(transports[3]), timeout_s=10.0) in ("PeerTimeout", "ended")
    runtimes[0].run(transports[0].end(b"pull-4"), timeout_s=5.0)


async def _loop_time() -> float:
    import asyncio

    return asyncio.get_running_loop().time()


async def _begin(transport, round_id, members, clients, deadline) -> None:
    transport.begin(round_id, members, clients, deadline)


def test_a_message_sent_again_on_a_reopened_pull_does_not_end_the_pull():
    # A reducer puts back what it was writing when a pull stream broke, even once the last
    # frame had gone out; the client refused the repeat as a protocol violation and never
    # pulled what followed it (here the reducer's result).
    import asyncio

    from shoal.errors import PeerUnavailable
    from shoal.net.identity import PeerID
    from shoal.net.tensors import decode_frame, encode_frame
    from shoal.parallel.data.messages import Reduced, Report
    from shoal.parallel.data.wire import encode_message

    reducer, client, rid, n = PeerID(b"r" * 32), PeerID(b"c" * 32), b"round", 1000

    class Runtime:  # what GrpcTransport asks of a runtime
        peer_id = client
        config = NetConfig()

        def add_servicer(self, *args):
            return []

    def frames(message):
        return [decode_frame(encode_frame(f)) for f in encode_message(message).frames()]

    report = Report(rid, reducer, 0, frozenset({reducer, client}), {})
    result = Reduced(rid, reducer, 0, frozenset({reducer, client}), 2.0, torch.ones(n))
    script = [(frames(report), True), (frames(report) + frames(result), False)]

    class Stub:
        def Pull(self, request, timeout_s):
            sent, breaks = script.pop(0)

            async def stream():
                for frame in sent:
                    yield frame
                if breaks:
                    raise PeerUnavailable("Pull: connection reset")

            return stream()

    async def main():
        transport = GrpcTransport(Runtime())
        transport._stub = lambda to: Stub()
        transport.inbox.open(rid, [reducer, client], [n, 0])
        await transport._pull(reducer, rid, asyncio.get_running_loop().time() + 5.0)
        return sorted(type(m).__name__ for m in transport.inbox.messages(rid)), script

    kinds, left = asyncio.run(main())
    assert kinds == ["Reduced", "Report"] and left == []


def test_a_message_written_into_a_connection_dead_on_the_client_side_comes_again(
    swarm, monkeypatch
):
    # A NAT rebinding breaks the client's pull on its side only: the reducer's end of the
    # stream stays open (until keepalive tells, 30 s) and writes the next message into it.
    # The client reopens and says it received one message: the reducer sends the rest.
    import asyncio
    import threading

    from shoal.errors import PeerUnavailable
    from shoal.parallel.data import outbox as outbox_module
    from shoal.parallel.data.messages import Reduced, Report
    from shoal.parallel.data.wire import encode_message

    runtimes, transports = swarm
    reducer, client, rid = runtimes[0].peer_id, runtimes[3].peer_id, b"pull-dead"
    report = Report(rid, reducer, 0, frozenset({reducer, client}), {})
    result = Reduced(rid, reducer, 0, frozenset({reducer, client}), 2.0, torch.ones(NUMEL))

    taken = threading.Event()  # the reducer's first stream took the result
    next_item = outbox_module._Pull.next

    async def noting(self):
        item = await next_item(self)
        if item is not None and item.tensors:  # the result (a report carries no tensor)
            taken.set()
        return item

    monkeypatch.setattr(outbox_module._Pull, "next", noting)

    async def post(message):
        transports[0]._outbox.post(client, rid, encode_message(message), 30.0)

    real_stub = transports[3]._stub
    opened = []

    class DeadAfterOne:  # the first stream: one message read, then dead on this side
        def __init__(self, stub):
            self._stub = stub

        def Pull(self, request, timeout_s):
            frames = self._stub.Pull(request, timeout_s=timeout_s)
            opened.append(request)
            if len(opened) > 1:
                return frames

            async def broken():
                async for frame in frames:
                    yield frame  # the report: a meta frame alone
                    break
                runtimes[0].submit(post(result))
                await asyncio.to_thread(taken.wait, 10.0)
                raise PeerUnavailable("Pull: connection reset on this side")

            return broken()

    transports[3]._stub = lambda to: DeadAfterOne(real_stub(to))

    async def pull_both():
        inbox = transports[3].inbox
        inbox.open(rid, [reducer, client], [NUMEL, 0])
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(transports[3]._pull(reducer, rid, loop.time() + 20.0))
        try:
            both = await inbox.wait_until(lambda: len(inbox.messages(rid)) == 2, loop.time() + 10)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return both, sorted(type(m).__name__ for m in inbox.messages(rid))

    runtimes[0].run(post(report), timeout_s=5.0)
    both, kinds = runtimes[3].run(pull_both(), timeout_s=30.0)
    assert taken.is_set()
    assert both and kinds == ["Reduced", "Report"]
    assert [r.received for r in opened] == [0, 1]
