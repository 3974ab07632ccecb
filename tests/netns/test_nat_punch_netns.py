"""``shoal.net.nat.punch`` through real NAT routers: cone-cone connects, symmetric does not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from netns_helpers import result, start

from shoal.testbed import Testbed

pytestmark = pytest.mark.netns

NAT_AGENT = str(Path(__file__).with_name("nat_agent.py"))


def test_library_punch_through_cone_nats_and_not_symmetric(bed: Testbed) -> None:
    relay = bed.hosts["relay"]
    start(relay, "rendezvous", 7500)
    start(relay, "rendezvous", 7501)
    pairs = {7500: ("a", "b"), 7501: ("d", "c")}  # cone-cone, cone-symmetric
    procs = {
        name: bed.hosts[name].popen(
            [sys.executable, NAT_AGENT, name, relay.address, str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for port, names in pairs.items()
        for name in names
    }
    outcome = {name: result(proc, 90) for name, proc in procs.items()}
    assert outcome["a"] == {"ok": True, "heard": "b", "attempts": outcome["a"]["attempts"]}, outcome
    assert outcome["b"]["ok"] and outcome["b"]["heard"] == "a", outcome
    assert outcome["c"]["ok"] is False and outcome["d"]["ok"] is False, outcome
    assert {outcome["c"]["error"], outcome["d"]["error"]} <= {"PeerUnavailable", "PeerTimeout"}
