"""``shoal peer`` behind NATs (the session ``bed``).

- relay and server2 run public DiLoCo peers; c sits behind home3's symmetric NAT and joins
  with no flag: its dial-back check finds that nobody can reach it, so it averages in
  client mode (it pulls its results) and still contributes to every round.
- Every trainer behind a NAT (a behind home1's cone, c behind the symmetric one), with only
  ``shoal dht serve --relay`` in public: both reserve a slot at that relay and reduce
  through it. As clients only, they could not form a group at all.
"""

from __future__ import annotations

import select
import subprocess
import sys
from pathlib import Path

import pytest
from peer_events import PeerEvents, ok_round, tiny_peer_argv, write_tiny_corpus

from shoal.testbed import Testbed

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PORT = 7700
RELAY_PORT = 7710
START_TIMEOUT_S = 150.0
ROUND_TIMEOUT_S = 120.0


class _Peer(PeerEvents):
    """One ``shoal peer`` inside a testbed host, listening on the host's address."""

    def __init__(
        self,
        bed: Testbed,
        host: str,
        run_dir: Path,
        data: Path,
        join: str = "",
        swarm: str = "nat-peers",
    ) -> None:
        listen = ["--host", bed.hosts[host].address, "--port", str(PORT)]
        argv = tiny_peer_argv(run_dir, data, swarm, *listen, *(["--join", join] if join else []))
        err_path = run_dir.with_suffix(".err")
        proc = bed.hosts[host].popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=open(err_path, "w"),  # noqa: SIM115 - closed with the process
            text=True,
        )
        super().__init__(proc, err_path, host)


def _stop(peers: list[_Peer]) -> None:
    """SIGTERM every peer; each must say it stopped, after some training."""
    for peer in peers:
        peer.proc.terminate()
    for peer in peers:
        assert peer.wait_for(lambda e: e.get("event") == "stopped", 30.0)["step"] > 0


def test_a_peer_behind_a_symmetric_nat_turns_client_and_trains(bed: Testbed, tmp_path: Path):
    data = write_tiny_corpus(tmp_path / "data")
    first = f"{bed.hosts['relay'].address}:{PORT}"
    peers: list[_Peer] = []
    try:
        relay = _Peer(bed, "relay", tmp_path / "relay", data)
        peers.append(relay)
        relay.wait_for(lambda e: e.get("event") == "listening", START_TIMEOUT_S)
        server2 = _Peer(bed, "server2", tmp_path / "server2", data, join=first)
        natted = _Peer(bed, "c", tmp_path / "c", data, join=first)
        peers += [server2, natted]

        public = server2.wait_for(lambda e: e.get("event") == "reachability", START_TIMEOUT_S)
        assert public["reached"] == 1 and not public["client_mode"], public
        hidden = natted.wait_for(lambda e: e.get("event") == "reachability", START_TIMEOUT_S)
        assert hidden["unreached"] == 1 and hidden["client_mode"], hidden

        rounds = [p.wait_for(ok_round(3), START_TIMEOUT_S + ROUND_TIMEOUT_S) for p in peers]
        last = max(r["round"] for r in rounds)
        for peer, first_ok in zip(peers, rounds, strict=True):
            if first_ok["round"] < last:
                peer.wait_for(ok_round(3, after=last - 1), ROUND_TIMEOUT_S)
        by_round = peers[0].agreed_rounds(*peers[1:], contributors=3)
        agreed = [r for r, fps in by_round.items() if len(fps) == 3 and len(set(fps)) == 1]
        assert agreed, f"no round where all three hold the same parameters: {by_round}"
        _stop(peers)
    finally:
        for peer in peers:
            peer.kill()


def test_peers_all_behind_nats_average_through_a_public_relay(bed: Testbed, tmp_path: Path):
    data = write_tiny_corpus(tmp_path / "data")
    relay_address = f"{bed.hosts['relay'].address}:{RELAY_PORT}"
    serve = ["shoal.cli.main", "dht", "serve", "--relay", "--swarm", "nat-relayed"]
    listen = ["--host", bed.hosts["relay"].address, "--port", str(RELAY_PORT)]
    relay = bed.hosts["relay"].popen(
        [sys.executable, "-m", *serve, *listen],
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "relay.err", "w"),  # noqa: SIM115 - closed with the process
        text=True,
    )
    peers: list[_Peer] = []
    try:
        assert relay.stdout is not None
        started, _, _ = select.select([relay.stdout], [], [], START_TIMEOUT_S)
        assert started, "the relay printed no address"
        assert relay.stdout.readline().startswith(relay_address)  # serving
        for host in ("a", "c"):
            peers.append(
                _Peer(bed, host, tmp_path / host, data, join=relay_address, swarm="nat-relayed")
            )
        for peer in peers:
            found = peer.wait_for(lambda e: e.get("event") == "reachability", START_TIMEOUT_S)
            assert found["unreached"] == 1 and not found["client_mode"], found
            assert found["relay"] == relay_address, found
        rounds = [p.wait_for(ok_round(2), START_TIMEOUT_S + ROUND_TIMEOUT_S) for p in peers]
        # Two clients form no group: an ok round means they reduced through the relay.
        assert all(r["group"] == 2 and r["contributors"] == 2 for r in rounds), rounds
        # every successful round holds both, so their first ones are the same round
        assert len({r["fingerprint"] for r in rounds}) == 1, rounds
        _stop(peers)
    finally:
        for peer in peers:
            peer.kill()
        relay.terminate()
        relay.wait(timeout=10)
