"""Real ``shoal peer`` processes on 127.0.0.1: they train DiLoCo rounds together, agree on
the outer parameters, survive a SIGKILL + restart of one of them, and stop on SIGTERM.

Every wait is on a JSON line a peer prints, with a deadline; nothing sleeps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from peer_events import PeerEvents, ok_round, tiny_peer_argv, write_tiny_corpus

START_TIMEOUT_S = 150.0
ROUND_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("data"))


class Peer(PeerEvents):
    """One ``shoal peer`` process on 127.0.0.1; stderr goes to a file in its run dir."""

    def __init__(
        self, run_dir: Path, data_dir: Path, join: str | None = None, extra: tuple[str, ...] = ()
    ) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        err_path = run_dir / f"peer-{time.monotonic_ns()}.err"
        argv = tiny_peer_argv(run_dir, data_dir, "itest", *(["--join", join] if join else []))
        proc = subprocess.Popen(
            argv + list(extra),
            stdout=subprocess.PIPE,
            stderr=open(err_path, "w"),  # noqa: SIM115 - closed with the process
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        super().__init__(proc, err_path, run_dir.name)


def _start_three(
    tmp_path: Path, data_dir: Path, peers: list[Peer], c_extra: tuple[str, ...] = ()
) -> str:
    """Start a, then b and c joining it (appended to ``peers`` as they start, for
    cleanup); returns a's address."""
    a = Peer(tmp_path / "a", data_dir)
    peers.append(a)
    address = a.wait_for(lambda e: e.get("event") == "listening", START_TIMEOUT_S)["address"]
    peers.append(Peer(tmp_path / "b", data_dir, join=address))
    peers.append(Peer(tmp_path / "c", data_dir, join=address, extra=c_extra))
    return str(address)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_peers_train_together_survive_sigkill_and_stop_cleanly(
    tmp_path: Path, data_dir: Path
) -> None:
    peers: list[Peer] = []
    try:
        address = _start_three(tmp_path, data_dir, peers)
        a, b, c = peers
        # All three average in one round and agree on the outer parameters.
        rounds = {p: p.wait_for(ok_round(3), START_TIMEOUT_S + ROUND_TIMEOUT_S) for p in peers}
        target = max(r["round"] for r in rounds.values())
        agreed = {p: p.wait_for(ok_round(2, after=target - 1), ROUND_TIMEOUT_S) for p in peers}
        by_round = peers[0].agreed_rounds(*peers[1:], contributors=3)
        common = [r for r, fps in by_round.items() if len(set(fps)) == 1]
        assert common, f"no round where all reported the same parameters: {by_round}"
        assert len({e["step"] for e in agreed.values()}) <= 2  # within one round of each other

        # SIGKILL c mid-run; a and b go on; c restarts from disk or the swarm and rejoins.
        killed_at = max(e["step"] for e in c.seen if "step" in e)
        c.kill()
        step_a = a.wait_for(ok_round(2), ROUND_TIMEOUT_S)["step"]
        c2 = Peer(tmp_path / "c", data_dir, join=address)
        peers.append(c2)
        recovered = c2.wait_for(lambda e: e.get("event") == "recovered", START_TIMEOUT_S)
        assert recovered["source"] in ("disk", "swarm") and recovered["step"] > 0
        assert recovered["step"] >= killed_at - 5  # loses at most the work since its last round
        back = c2.wait_for(ok_round(2), START_TIMEOUT_S + ROUND_TIMEOUT_S)
        later = a.wait_for(ok_round(2, after=back["round"] - 1), ROUND_TIMEOUT_S)
        assert later["step"] > step_a

        # SIGTERM: every peer stops within a few seconds and says so.
        for p in (a, b, c2):
            p.proc.send_signal(signal.SIGTERM)
        for p in (a, b, c2):
            stopped = p.wait_for(lambda e: e.get("event") == "stopped", 30.0)
            assert stopped["step"] > 0
            assert p.proc.wait(timeout=30.0) == 0
    finally:
        for p in peers:
            p.kill()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_client_nobody_can_dial_averages_with_the_swarm(tmp_path: Path, data_dir: Path) -> None:
    # c announces an address where nothing listens (port 9, discard): every round it takes
    # part in proves that nobody dialed it; it pulls its results from the reducers.
    peers: list[Peer] = []
    try:
        _start_three(
            tmp_path, data_dir, peers, c_extra=("--client-mode", "--announce", "127.0.0.1:9")
        )
        _, b, c = peers
        # b checked that the swarm can dial it back (so it reduces); c was told not to.
        checked = b.wait_for(lambda e: e.get("event") == "reachability", START_TIMEOUT_S)
        assert checked["reached"] == 1 and not checked["client_mode"], checked
        rounds = {p: p.wait_for(ok_round(3), START_TIMEOUT_S + ROUND_TIMEOUT_S) for p in peers}
        assert len({r["round"] for r in rounds.values()}) <= 2, rounds
        assert not any(e.get("event") == "reachability" for e in c.seen)
        target = max(r["round"] for r in rounds.values())
        for p in peers:
            p.wait_for(ok_round(3, after=target - 1), ROUND_TIMEOUT_S)
        by_round = peers[0].agreed_rounds(*peers[1:], contributors=3)
        agreed = [r for r, fps in by_round.items() if len(fps) == 3 and len(set(fps)) == 1]
        assert agreed, f"no round where all three hold the same parameters: {by_round}"
        for p in peers:
            p.proc.send_signal(signal.SIGTERM)
        for p in peers:
            assert p.wait_for(lambda e: e.get("event") == "stopped", 30.0)["step"] > 0
            assert p.proc.wait(timeout=30.0) == 0
    finally:
        for p in peers:
            p.kill()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_error_feedback_written_less_often_than_every_round_survives_a_stop(
    tmp_path: Path, data_dir: Path
) -> None:
    # With a checkpoint every 5 rounds, the own state (top-k error feedback) of the last
    # applied round is written when the peer stops, the run dir notes that round, and a
    # restart takes it back (it used to be refused whenever checkpoints were not written
    # at every round).
    from shoal.state.checkpoint import load_latest_valid
    from shoal.train.run_state import checkpoint_root
    from shoal.train.swarm_state import last_applied_count, local_is_current

    extra = ("--topk", "0.1", "--codec", "sparse", "--checkpoint-every", "5")
    peers: list[Peer] = []
    try:
        a = Peer(tmp_path / "a", data_dir, extra=extra)
        peers.append(a)
        address = a.wait_for(lambda e: e.get("event") == "listening", START_TIMEOUT_S)["address"]
        b = Peer(tmp_path / "b", data_dir, join=address, extra=extra)
        peers.append(b)
        first = b.wait_for(ok_round(2), START_TIMEOUT_S + ROUND_TIMEOUT_S)
        b.wait_for(ok_round(2, after=first["round"]), ROUND_TIMEOUT_S)
        b.proc.send_signal(signal.SIGTERM)
        b.wait_for(lambda e: e.get("event") == "stopped", 30.0)
        assert b.proc.wait(timeout=30.0) == 0
        saved = load_latest_valid(checkpoint_root(tmp_path / "b"))
        assert saved is not None and saved.local, "no own state written at the stop"
        applied = last_applied_count(tmp_path / "b")
        assert applied is not None and applied >= 2
        assert local_is_current(saved.meta["applied_rounds"], applied)
        b2 = Peer(tmp_path / "b", data_dir, join=address, extra=extra)
        peers.append(b2)
        b2.wait_for(lambda e: e.get("event") == "recovered", START_TIMEOUT_S)
        b2.wait_for(ok_round(2), START_TIMEOUT_S + ROUND_TIMEOUT_S)
        log = b2.err_path.read_text()
        assert "not taken back" not in log and "not restored" not in log, log[-2000:]
    finally:
        for p in peers:
            p.kill()
