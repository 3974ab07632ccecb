"""``PeerServices`` on loopback: the trainer count a round expects comes from a fresh view."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from shoal.errors import ProtocolViolation
from shoal.net import Identity
from shoal.state.announce import state_key
from shoal.swarm.peerinfo import MAX_ROLE_CHARS
from shoal.train.swarm_config import PeerOptions
from shoal.train.swarm_services import PeerServices, round_scope, scope_difference, state_scope


def test_a_round_expects_the_peers_that_joined_since_the_last_refresh(tmp_path: Path) -> None:
    events: list[tuple[str, dict]] = []

    def emit(event: str, **fields: object) -> None:
        events.append((event, fields))

    first = PeerServices.start(PeerOptions(run_dir=tmp_path / "a"), Identity.generate(), emit)
    second = None
    try:
        # Freeze the first peer's cached view: no background refresh from here on.
        first.runtime.run(first.membership.close(), timeout_s=5.0)
        first.runtime.run(first.membership.refresh(), timeout_s=10.0)
        joiner = PeerOptions(run_dir=tmp_path / "b", join=(first.runtime.address,))
        second = PeerServices.start(joiner, Identity.generate(), emit)
        second.runtime.run(second.membership.heartbeat(), timeout_s=10.0)  # stored now
        assert first.trainers() == 1  # the cached view predates the joiner
        view = first.runtime.run(first.fresh_view(), timeout_s=10.0)
        assert view.compatible == 2 and view.other_scopes == ()
        # The joiner checked that it can be dialed back, so it reduces.
        checks = [f for e, f in events if e == "reachability"]
        assert checks == [
            {"reached": 1, "unreached": 0, "mapping": "unknown", "client_mode": False}
        ]
        assert not second.opts.client_mode
        # Snapshots are announced per mode: a fresher sync-mode snapshot must not hide the
        # diloco ones from a diloco peer's resync (it would be refused on mode).
        assert first.state_key == state_key("default", scope=state_scope(first.opts))
        assert state_scope(first.opts).startswith("diloco/")
        # ...and per model shape: a stale peer fetched outer state it could not load.
        wider = PeerOptions(model_overrides={"d_model": 96})
        assert state_scope(wider) != state_scope(first.opts)
        assert state_scope(PeerOptions(mode="sync")) != state_scope(first.opts)
    finally:
        if second is not None:
            second.close()
        first.close()


def test_snapshots_are_shared_only_between_peers_that_average_together() -> None:
    # Announced under mode and model only, a peer took the outer state of a peer of other
    # settings (they never meet in a round) and then met neither group again.
    variants = [
        {},
        {"wire_codec": "int4"},
        {"rank": 4},
        {"rank": 8},
        {"topk": 0.03, "wire_codec": "sparse"},
        {"aggregation": "trimmed_mean"},
        {"mode": "streaming"},
        {"mode": "streaming", "fragments": 2},
        {"model_overrides": {"d_model": 96}},
    ]
    opts = [PeerOptions(**v) for v in variants]  # type: ignore[arg-type]
    assert len({round_scope(o) for o in opts}) == len(opts)
    assert len({state_scope(o) for o in opts}) == len(opts)
    assert state_scope(PeerOptions(rank=4)) == state_scope(PeerOptions(rank=4, seed=9))
    assert all(state_scope(o).startswith(o.mode + "/") for o in opts)


def test_peers_set_apart_by_a_setting_are_not_counted_and_are_named(tmp_path: Path) -> None:
    first = PeerServices.start(PeerOptions(run_dir=tmp_path / "a"), Identity.generate(), _quiet)
    other = None
    try:
        join = (first.runtime.address,)
        fp16 = PeerOptions(run_dir=tmp_path / "b", join=join, wire_codec="fp16")
        other = PeerServices.start(fp16, Identity.generate(), _quiet)
        other.runtime.run(other.membership.heartbeat(), timeout_s=10.0)
        view = first.runtime.run(first.fresh_view(), timeout_s=10.0)
        assert view.compatible == 1 and len(view.other_scopes) == 1
        reason = view.alone_reason()
        assert reason.startswith(
            "alone: no other live peer found that trains with these settings; "
        )
        assert (
            "1 live diloco peer uses other settings: codec=fp16 (here: diloco codec=int8" in reason
        )
        # the round scope holds every setting that changes what a round's vector is
        diloco, streaming = PeerOptions(mode="diloco"), PeerOptions(mode="streaming")
        for base, changed in (
            (diloco, {"wire_codec": "int4"}),
            (diloco, {"rank": 2}),
            (replace(diloco, wire_codec="sparse"), {"topk": 0.01}),
            (streaming, {"fragments": 2}),
            (diloco, {"model_overrides": {"d_model": 96}}),
            (diloco, {"aggregation": "trimmed_mean"}),
            (streaming, {"aggregation": "centered_clip"}),
            (diloco, {"max_group_size": 8}),
        ):
            assert round_scope(replace(base, **changed)) != round_scope(base), changed
        assert (
            scope_difference(round_scope(diloco), round_scope(replace(diloco, rank=2))) == "rank=2"
        )
        assert "group=" not in round_scope(diloco)  # the default keeps existing keys
        # peers that pick fragments by step count and rotation never meet these
        assert "sched=counts" in round_scope(streaming) and "sched" not in round_scope(diloco)
        sparse = replace(diloco, wire_codec="sparse")
        assert (
            round_scope(sparse)
            == "diloco codec=sparse rank=0 model=" + round_scope(diloco).rpartition("model=")[2]
        )  # no top-k, no field: dense peers' keys stay as they were
        # peers of another board format are told apart, and said to be another version
        old = round_scope(diloco).replace(" v=7", "")
        assert scope_difference(round_scope(diloco), old) == "v=? (another version of Shoal)"
        # low-rank peers from before the dense values moved to the second exchange
        lowrank = round_scope(replace(diloco, rank=2))
        old = lowrank.replace(" lowrank=2", "")
        assert scope_difference(lowrank, old) == "lowrank=? (another version of Shoal)"
        # the longest scope still fits a membership role (6 digits of a top-k fraction)
        longest = round_scope(replace(sparse, topk=1.23456e-05, aggregation="centered_clip"))
        assert len("trainer:" + longest) <= MAX_ROLE_CHARS
        # only settings a mode uses set peers apart
        assert round_scope(replace(streaming, overlap_steps=1)) == round_scope(streaming)
        # a board entry's address is dialed only if it is host:port (or relay:host:port)
        them = other.runtime.peer_id
        dial = first.dial_address
        assert first.runtime.run(dial(them, "198.18.0.9:7700"), timeout_s=5.0) == "198.18.0.9:7700"
        for bad in ("unix:/tmp/peer.sock", "relay:unix:/x", "relay:", "dns:///x:1"):
            with pytest.raises(ProtocolViolation):
                first.runtime.run(dial(them, bad), timeout_s=5.0)
    finally:
        if other is not None:
            other.close()
        first.close()


def _quiet(event: str, **fields: object) -> None:
    pass


def test_a_peer_announced_by_name_is_dialed_back_and_reduces(tmp_path: Path) -> None:
    """A helper dials only the IP it saw us come from: the announced name is resolved
    before asking, or a reachable peer would turn itself into a client."""
    import socket

    events: list[tuple[str, dict]] = []

    def emit(event: str, **fields: object) -> None:
        events.append((event, fields))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first = PeerServices.start(PeerOptions(run_dir=tmp_path / "a"), Identity.generate(), emit)
    second = None
    try:
        named = PeerOptions(
            run_dir=tmp_path / "b",
            port=port,
            announce=f"localhost:{port}",
            join=(first.runtime.address,),
        )
        second = PeerServices.start(named, Identity.generate(), emit)
        (check,) = [f for e, f in events if e == "reachability"]
        assert check["reached"] == 1 and check["client_mode"] is False
        assert not second.opts.client_mode
    finally:
        if second is not None:
            second.close()
        first.close()


def test_a_failed_start_names_the_cause_and_leaves_nothing_running(tmp_path: Path) -> None:
    """--metrics-port already taken: a clear error, and the runtime's thread is gone."""
    import socket
    import threading

    import pytest

    from shoal.errors import ConfigError

    before = {t.name for t in threading.enumerate()}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        opts = PeerOptions(run_dir=tmp_path, metrics_port=port)
        with pytest.raises(ConfigError, match=f"metrics on port {port}"):
            PeerServices.start(opts, Identity.generate(), lambda *a, **k: None)
    left = {t.name for t in threading.enumerate() if t.is_alive()} - before
    assert not any(name.startswith("shoal-net") for name in left), left


def test_members_addresses_resolve_together_and_within_a_bound():
    # Relayed members need their relays asked. One after another, a round of such members
    # spent their dial times in sum before its all-reduce began; a relay that never
    # answered held the round past the deadline its caller waits for.
    import asyncio
    from types import SimpleNamespace

    from shoal.dht.virtual_loop import run_virtual
    from shoal.errors import PeerUnavailable
    from shoal.net.identity import PeerID
    from shoal.parallel.data.matchmaking import ReadyPeer
    from shoal.parallel.data.rendezvous import Group
    from shoal.train.swarm_round import SwarmRounds
    from shoal.train.swarm_round_config import DIAL_RESOLVE_S

    me = bytes([1]) * 32
    peers = [me] + [bytes([i]) * 32 for i in range(2, 7)]
    group = Group(b"g", tuple(ReadyPeer(p, 1.0, 1e8, False, f"h{p[0]}:1") for p in peers))

    async def dial(peer: PeerID, address: str) -> str:
        n = peer.raw[0]
        if n == 5:
            raise PeerUnavailable("relay refused")
        await asyncio.sleep(3600.0 if n == 6 else 2.0)  # 6: its relay never answers
        return "via-relay/" + address

    rounds = SimpleNamespace(dial_address=dial, runtime=SimpleNamespace(peer_id=PeerID(me)))

    async def main():
        loop = asyncio.get_running_loop()
        start = loop.time()
        resolved = await SwarmRounds._dialable(rounds, group)
        return resolved, loop.time() - start

    resolved, took = run_virtual(main())
    assert took == pytest.approx(DIAL_RESOLVE_S)  # not 4 x 2 s plus an hour
    assert [m.address for m in resolved.members] == [
        "h1:1",  # its own, as announced
        "via-relay/h2:1",
        "via-relay/h3:1",
        "via-relay/h4:1",
        "",  # refused: sends to it fail, and the round goes on without it
        "",  # timed out
    ]
