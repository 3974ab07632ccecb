"""Two halves of a DiLoCo swarm cut apart train on, and become one swarm again once healed.

Four ``shoal peer --mode diloco`` (or ``streaming``) processes on four public hosts of a
testbed of their own. Cut into two pairs, each pair averages on its own and their outer
parameters diverge; the pairs then meet under different round keys. After the cut heals, the pair behind (or, with
as many rounds applied from rounds of as many contributors, the one whose outer fingerprint
is greater) takes the other's outer
state, and all four average together again with one set of parameters.
"""

from __future__ import annotations

import subprocess
import time
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


def _peer(bed: Testbed, host: str, root: Path, data: Path, join: str, mode: str) -> PeerEvents:
    listen = ["--host", bed.hosts[host].address, "--port", str(PORT)]
    extra = ["--join", join] if join else []
    if mode == "streaming":
        extra += ["--mode", "streaming", "--fragments", "2"]
    argv = tiny_peer_argv(root / host, data, "split-swarm", *listen, *extra)
    err_path = (root / host).with_suffix(".err")
    proc = bed.hosts[host].popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=open(err_path, "w"),  # noqa: SIM115 - closed with the process
        text=True,
    )
    return PeerEvents(proc, err_path, host)


def _round_of(contributors: int):
    """A successful round with exactly ``contributors``."""
    return lambda e: ok_round(contributors)(e) and e["contributors"] == contributors


def _rounds_of_all_until_one_state(peers: dict[str, PeerEvents]) -> dict[str, list[str]]:
    """Each peer's outer fingerprints after its next rounds of all four, read until one
    fingerprint is common to all of them (within ``HEAL_TIMEOUT_S``)."""
    seen: dict[str, list[str]] = {h: [] for h in peers}
    deadline = time.monotonic() + HEAL_TIMEOUT_S
    try:
        while not set.intersection(*(set(prints) for prints in seen.values())):
            for h, p in peers.items():
                left = deadline - time.monotonic()
                assert left > 0, f"no common state within {HEAL_TIMEOUT_S} s: {seen}"
                seen[h].append(p.wait_for(_round_of(4), left)["fingerprint"])
    except AssertionError as exc:  # what every peer did about the other side, to tell why
        raise AssertionError(f"{exc}\n{_heal_story(peers)}") from None
    return seen


def _heal_story(peers: dict[str, PeerEvents]) -> str:
    """Each peer's log lines about bans, resyncs and refusals."""
    words = ("banned", "fetched", "refused", "no state", "unavailable")
    lines = []
    for h, p in peers.items():
        for line in p.err_path.read_text(errors="replace").splitlines():
            if any(w in line for w in words):
                lines.append(f"{h}: {line[:200]}")
    return "\n".join(lines[-120:])


@pytest.mark.parametrize("mode", ["diloco", "streaming"])
def test_the_halves_of_a_healed_partition_average_together_again(
    netns_ok: None, tmp_path: Path, mode: str
) -> None:
    data = write_tiny_corpus(tmp_path / "data")
    with Testbed(Topology(hosts=[Public(name=h) for h in HOSTS])) as bed:
        first = f"{bed.hosts['p1'].address}:{PORT}"
        peers: dict[str, PeerEvents] = {}
        try:
            peers["p1"] = _peer(bed, "p1", tmp_path, data, "", mode)
            peers["p1"].wait_for(lambda e: e.get("event") == "listening", START_TIMEOUT_S)
            for host in HOSTS[1:]:
                peers[host] = _peer(bed, host, tmp_path, data, first, mode)
            for p in peers.values():
                p.wait_for(ok_round(4), START_TIMEOUT_S)

            for p in peers.values():
                p.drain()  # rounds that ended before the cut are not the pairs' own
            bed.partition(["p1", "p2"], ["p3", "p4"])
            try:
                # Each pair applies rounds of its own; their outer parameters part ways.
                split = {h: p.wait_for(_round_of(2), SPLIT_TIMEOUT_S) for h, p in peers.items()}
            finally:
                bed.heal()
            for p in peers.values():
                p.drain()  # what ended during the cut is not after the heal
            healed_at = {h: len(p.seen) for h, p in peers.items()}
            assert split["p1"]["fingerprint"] != split["p3"]["fingerprint"], split
            # One swarm again: rounds of all four, ending with one outer state everywhere
            # (streaming: a fragment that did not diverge may meet before one that did).
            states = _rounds_of_all_until_one_state(peers)
            resynced = {
                h
                for h, p in peers.items()
                if any(e.get("resynced") for e in p.seen[healed_at[h] :])
            }
            if mode == "diloco":  # one pair joined the other (both of its peers)
                assert {"p1", "p2"} <= resynced or {"p3", "p4"} <= resynced, (resynced, states)
            else:  # each pair may have been ahead on a fragment
                assert resynced, states
        finally:
            for peer in peers.values():
                peer.proc.terminate()
            for peer in peers.values():
                try:
                    peer.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    peer.kill()
