"""``PeerServices`` on loopback: the trainer count a round expects comes from a fresh view."""

from __future__ import annotations

from pathlib import Path

from shoal.net import Identity
from shoal.state.announce import state_key
from shoal.train.swarm_config import PeerOptions
from shoal.train.swarm_services import PeerServices, state_scope


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
        assert first.runtime.run(first.fresh_trainers(), timeout_s=10.0) == 2
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
