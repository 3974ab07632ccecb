"""Thin wrappers over ``ip``, ``iptables-restore`` and ``/proc/sys`` for network namespaces.

Every command has a timeout and raises ``TestbedError`` (naming the command and its stderr)
when it fails. Nothing here knows about topologies.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence

from shoal.errors import TestbedError
from shoal.testbed.procs import pid_alive

__all__ = [
    "TestbedError",
    "delete_netns",
    "ip",
    "iptables_restore",
    "list_netns",
    "missing_tools",
    "netns_exec_argv",
    "netns_pids",
    "run",
    "set_sysctls",
]

REQUIRED_TOOLS = ("ip", "tc", "iptables", "iptables-restore")


def missing_tools() -> list[str]:
    """Required commands that are not on PATH (empty when the testbed can run)."""
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun")
    return missing


def run(argv: Sequence[str], *, input: str | None = None, timeout_s: float = 15.0) -> str:
    """Run ``argv``; return stdout; raise ``TestbedError`` on failure or timeout."""
    try:
        done = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TestbedError(f"{' '.join(argv)}: {exc}") from exc
    if done.returncode != 0:
        raise TestbedError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def ip(*args: str, netns: str | None = None, timeout_s: float = 15.0) -> str:
    """``ip [-n NETNS] ARGS...``."""
    prefix = ["ip"] if netns is None else ["ip", "-n", netns]
    return run([*prefix, *args], timeout_s=timeout_s)


def netns_exec_argv(netns: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs ``argv`` inside ``netns``."""
    return ["ip", "netns", "exec", netns, *argv]


def iptables_restore(netns: str, rules: str, *, flush: bool) -> None:
    """Load ``rules`` (iptables-save format) into ``netns``; ``flush=False`` keeps others."""
    argv = ["iptables-restore", "-w", "5"] + ([] if flush else ["--noflush"])
    run(netns_exec_argv(netns, argv), input=rules)


def set_sysctls(netns: str, values: dict[str, str]) -> None:
    """Write ``/proc/sys/<key>`` values inside ``netns`` (keys like ``net/ipv4/ip_forward``)."""
    script = "".join(f"echo {value} > /proc/sys/{key}\n" for key, value in values.items())
    run(netns_exec_argv(netns, ["sh", "-e", "-c", script]))


def list_netns() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def netns_pids(netns: str) -> list[int]:
    """Processes running inside ``netns``."""
    try:
        out = ip("netns", "pids", netns)
    except TestbedError:
        return []
    return [int(tok) for tok in out.split() if tok.isdigit()]


def delete_netns(netns: str, *, stop_timeout_s: float = 3.0) -> None:
    """Stop every process inside ``netns`` (TERM, then KILL after the deadline), delete it."""
    pids = netns_pids(netns)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + stop_timeout_s
        while pids and time.monotonic() < deadline:
            _reap(pids)
            pids = [pid for pid in pids if pid_alive(pid)]
            if pids:
                time.sleep(0.02)
        if not pids:
            break
    if netns in list_netns():
        ip("netns", "del", netns)


def _reap(pids: list[int]) -> None:
    """Collect our own children among ``pids`` so they do not linger as zombies."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
