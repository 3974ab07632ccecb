"""Two halves of a DiLoCo swarm cut apart train on, and become one swarm again once healed.

Four ``shoal peer --mode diloco`` processes on four public hosts of a testbed of their own.
Cut into two pairs, each pair averages on its own and their outer parameters diverge; the
pairs then meet under different round keys. After the cut heals, the pair behind (or, with
as many rounds applied, the one whose outer fingerprint is greater) takes the other's outer
state, and all four average together again with one set of parameters.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from peer_events import PeerEvents, ok_round, tiny_peer_argv, write_tiny_corpus

from shoal.testbed import Public, Testbed, Topology

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PORT = 7800
HOSTS = ("p1", "p2", "p3", "p4")
START_TIMEOUT_S = 150.0
SPLIT_TIMEOUT_S = 90.0
HEAL_TIMEOUT_S = 120.0


def _peer(bed: Testbed, host: str, root: Path, data: Path, join: str) -> PeerEvents:
    listen = ["--host", bed.hosts[host].address, "--port", str(PORT)]
    extra = ["--join", join] if join else []
    argv = tiny_peer_argv(root / host, data, "split-swarm", *listen, *extra)
    err_path = (root / host).with_suffix(".err")
    proc = bed.hosts[host].popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=open(err_path, "w"),  # noqa: SIM115 - closed with the process
        text=True,
    )
    return PeerEvents(proc, err_path, host)


def _round_of(contributors: int, after: int):
    """A successful round with exactly ``contributors``, later than round ``after``."""
    return lambda e: ok_round(contributors, after)(e) and e["contributors"] == contributors


def test_the_halves_of_a_healed_partition_average_together_again(
    netns_ok: None, tmp_path: Path
) -> None:
    data = write_tiny_corpus(tmp_path / "data")
    with Testbed(Topology(hosts=[Public(name=h) for h in HOSTS])) as bed:
        first = f"{bed.hosts['p1'].address}:{PORT}"
        peers: dict[str, PeerEvents] = {}
        try:
            peers["p1"] = _peer(bed, "p1", tmp_path, data, "")
            peers["p1"].wait_for(lambda e: e.get("event") == "listening", START_TIMEOUT_S)
            for host in HOSTS[1:]:
                peers[host] = _peer(bed, host, tmp_path, data, first)
            together = {h: p.wait_for(ok_round(4), START_TIMEOUT_S) for h, p in peers.items()}

            bed.partition(["p1", "p2"], ["p3", "p4"])
            try:
                # Each pair applies rounds of its own; their outer parameters part ways.
                split = {
                    h: p.wait_for(_round_of(2, together[h]["round"]), SPLIT_TIMEOUT_S)
                    for h, p in peers.items()
                }
            finally:
                bed.heal()
            assert split["p1"]["fingerprint"] != split["p3"]["fingerprint"], split
            # (round counts are each peer's own: a pair's may run ahead of the other's)
            whole = {
                h: p.wait_for(_round_of(4, split[h]["round"]), HEAL_TIMEOUT_S)
                for h, p in peers.items()
            }
            # One swarm again: the first round of all four leaves them one outer state.
            assert len({e["fingerprint"] for e in whole.values()}) == 1, whole
            resynced = [h for h, p in peers.items() if any(e.get("resynced") for e in p.seen)]
            assert resynced in (["p1", "p2"], ["p3", "p4"]), resynced  # one pair joined the other
        finally:
            for peer in peers.values():
                peer.proc.terminate()
            for peer in peers.values():
                try:
                    peer.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    peer.kill()
