"""``Testbed``: builds a ``Topology`` out of network namespaces, and removes it again.

Layout (``P`` is the testbed prefix, e.g. ``sh1a2b3-``):

- namespace ``P inet`` holds bridge ``P br``: the internet segment;
- each site (public host or NAT router) is namespace ``P<name>`` with a veth to the bridge;
  a rate cap is a ``tc tbf`` on both ends of that veth (upload and download);
- a NAT router has a LAN bridge, one veth per LAN host (namespace ``P<host>``), iptables
  ``MASQUERADE`` (``--random-fully`` for ``symmetric``) and a home-router filter: on the WAN
  side INPUT and FORWARD accept ESTABLISHED,RELATED and silently DROP the rest;
- when any site has a delay, every endpoint routes its traffic to other sites through a TUN
  device served by ``shoal.testbed.delayer`` (see there);
- every endpoint has an iptables chain ``P part`` (hooked from INPUT and OUTPUT) that
  ``partition()`` fills with DROP rules and ``heal()`` empties.

Everything lives in the testbed's namespaces, so deleting them removes every interface and
rule. ``up()`` first removes leftovers of dead runs; ``down()`` is idempotent and also runs
when ``up()`` fails half-way.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.errors import ConfigError
from shoal.testbed import netns as nx
from shoal.testbed.build import build_topology
from shoal.testbed.host import Host
from shoal.testbed.registry import (
    Record,
    new_prefix,
    process_start_time,
    record_path,
    remove_stale,
    write_record,
)
from shoal.testbed.topology import INTERNET_NET, AddressPlan, Nat, Topology, plan_addresses

__all__ = ["Testbed", "TestbedConfig"]


@dataclass(kw_only=True, slots=True)
class TestbedConfig:
    """Where records go and how long each step may take."""

    __test__ = False

    state_dir: Path = Path("/run/shoal-testbed")
    """Ownership records (see ``registry``)."""
    ready_timeout_s: float = 15.0
    """Deadline for a delayer process to attach to its TUN device."""
    stop_timeout_s: float = 3.0
    """Deadline for processes to exit after SIGTERM before SIGKILL, at teardown."""
    tbf_burst_s: float = 0.004
    """tc tbf bucket depth as time at the cap (at least 16 KiB)."""
    tbf_queue_s: float = 0.1
    """tc tbf queue as time at the cap (its ``latency``)."""
    persistent: bool = False
    """Keep running after this process exits (``shoal testbed up``); ``down`` removes it."""
    python: str = sys.executable

    def __post_init__(self) -> None:
        for name in ("ready_timeout_s", "stop_timeout_s", "tbf_burst_s", "tbf_queue_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")


class Testbed:
    """A running topology; use as a context manager (``with Testbed(topo) as tb:``)."""

    __test__ = False

    def __init__(self, topology: Topology, config: TestbedConfig | None = None) -> None:
        self.topology = topology
        self.config = config or TestbedConfig()
        self.plan: AddressPlan = plan_addresses(topology)
        self.prefix = new_prefix()
        self.hosts: dict[str, Host] = {}
        self._record = Record(
            prefix=self.prefix,
            pid=os.getpid(),
            start_time=process_start_time(os.getpid()),
            persistent=self.config.persistent,
        )
        self._state = "new"

    # ---- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> Testbed:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        """Remove leftovers of dead runs, then build; on any error, remove what was built."""
        if self._state != "new":
            raise nx.TestbedError(f"testbed {self.prefix} is {self._state}, cannot start it")
        missing = nx.missing_tools()
        if missing:
            raise nx.TestbedError(f"testbed needs {', '.join(missing)}")
        self._state = "building"
        remove_stale(self.config.state_dir, stop_timeout_s=self.config.stop_timeout_s)
        self._record.namespaces = self._namespace_names()
        write_record(self.config.state_dir, self._record)
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        self._state = "up"

    def down(self) -> None:
        """Stop every process and delete every namespace; safe to call twice."""
        if self._state in ("down", "new"):
            self._state = "down"
            return
        self._state = "down"
        for host in self.hosts.values():
            host.stop_processes(self.config.stop_timeout_s)
        errors = []
        for name in self._record.namespaces:
            try:
                nx.delete_netns(name, stop_timeout_s=self.config.stop_timeout_s)
            except nx.TestbedError as exc:
                errors.append(str(exc))
        record_path(self.config.state_dir, self.prefix).unlink(missing_ok=True)
        if errors:
            raise nx.TestbedError("; ".join(errors))

    # ---- partitions -------------------------------------------------------------------

    def partition(self, *groups: Sequence[str]) -> None:
        """Drop all traffic between hosts of different groups (names of hosts or NATs).

        A NATed host is known outside its home by its router's WAN address, so cutting it
        off from a public host cuts off its whole home from that host. Replaces any
        earlier partition; hosts in no group are unaffected.
        """
        members: dict[str, int] = {}
        for index, group in enumerate(groups):
            for name in group:
                for endpoint in self._endpoints_of(name):
                    if members.setdefault(endpoint, index) != index:
                        raise ConfigError(f"partition: {endpoint!r} is in two groups")
        self.heal()
        for name, mine in members.items():
            host = self.hosts[name]
            drops: set[str] = set()
            for other, theirs in members.items():
                if theirs == mine:
                    continue
                peer = self.hosts[other]
                drops.add(peer.address)
                if peer.public_address != host.public_address:
                    drops.add(peer.public_address)
            rules = [
                f"-A {self._chain} -s {a} -j DROP\n-A {self._chain} -d {a} -j DROP"
                for a in sorted(drops)
            ]
            nx.iptables_restore(
                host.netns, "*filter\n" + "\n".join(rules) + "\nCOMMIT\n", flush=False
            )

    def heal(self) -> None:
        """Remove every partition."""
        for host in self.hosts.values():
            if host.role != "router":
                nx.iptables_restore(host.netns, f"*filter\n-F {self._chain}\nCOMMIT\n", flush=False)

    def record(self) -> Record:
        """The ownership record (what ``shoal testbed down`` / ``exec`` need)."""
        return self._record

    # ---- building ---------------------------------------------------------------------

    @property
    def _chain(self) -> str:
        return f"{self.prefix}part"

    @property
    def _inet(self) -> str:
        return f"{self.prefix}inet"

    def _namespace_names(self) -> list[str]:
        return [self._inet, *(f"{self.prefix}{name}" for name in self.plan.hosts)]

    def _endpoints_of(self, name: str) -> list[str]:
        if name not in self.hosts:
            raise ConfigError(f"partition: unknown host {name!r}")
        site = next((s for s in self.topology.hosts if s.name == name), None)
        return list(site.hosts) if isinstance(site, Nat) else [name]

    def _build(self) -> None:
        build_topology(self)
        self._record.hosts = {
            name: {
                "netns": h.netns,
                "address": h.address,
                "public_address": h.public_address,
                "role": h.role,
            }
            for name, h in self.hosts.items()
        }
        write_record(self.config.state_dir, self._record)

    def describe(self) -> dict[str, Any]:
        """Hosts and addresses, for printing."""
        return {"prefix": self.prefix, "internet": INTERNET_NET, "hosts": self._record.hosts}
