"""Fixtures for tests that build real network namespaces (root, iproute2, iptables, TUN).

Tests here are marked ``netns``; they skip with the reason when the machine cannot run them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from netns_helpers import ECHO, HOME2_DELAY_MS, SLOW_DELAY_MS, SLOW_RATE_BIT_S, start

from shoal.testbed import Nat, Public, Testbed, Topology
from shoal.testbed.netns import missing_tools


def netns_skip_reason() -> str | None:
    """Why network-namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    missing = missing_tools()
    if missing:
        return f"needs {', '.join(missing)} (Debian: make system-deps)"
    return None


@pytest.fixture(scope="session")
def netns_ok() -> None:
    """Skip the requesting test when network namespaces are not usable."""
    reason = netns_skip_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def bed(netns_ok: None) -> Iterator[Testbed]:
    """One topology for the session (building it takes a couple of seconds); echo on ECHO.

        relay, server2          public hosts, unshaped
        slow                    public host, 20 Mbit/s each way, 25 ms one-way delay
        home1 (cone)            LAN hosts a, d
        home2 (cone)            LAN host b, 10 ms one-way delay
        home3 (symmetric)       LAN host c

    Tests that partition it heal it before they return.
    """
    topology = Topology(
        hosts=[
            Public(name="relay"),
            Public(name="server2"),
            Public(name="slow", rate_mbit=SLOW_RATE_BIT_S / 1e6, delay_ms=SLOW_DELAY_MS),
            Nat(name="home1", kind="cone", hosts=["a", "d"]),
            Nat(name="home2", kind="cone", hosts=["b"], delay_ms=HOME2_DELAY_MS),
            Nat(name="home3", kind="symmetric", hosts=["c"]),
        ]
    )
    with Testbed(topology) as testbed:
        for name in ("relay", "server2", "slow"):
            start(testbed.hosts[name], "echo", ECHO)
        yield testbed
