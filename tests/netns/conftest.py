"""Fixtures for tests that build real network namespaces (root, iproute2, iptables, TUN).

Tests here are marked ``netns``; they skip with the reason when the machine cannot run them.
"""

from __future__ import annotations

import os

import pytest

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
