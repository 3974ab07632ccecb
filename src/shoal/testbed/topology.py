"""Declarative test topologies and their address plan (pure: no I/O beyond reading TOML).

A topology is a list of *sites* on one flat "internet" segment (a bridge):

- ``Public(name)``: a host with a public address.
- ``Nat(name, kind, hosts)``: a home router with a public WAN address and a private LAN
  behind it holding ``hosts``. ``kind="cone"`` keeps source ports where it can
  (endpoint-independent mapping, like most home routers); ``kind="symmetric"`` picks a
  random port per connection. Both drop unsolicited inbound silently.

Each site's access link has an optional rate cap (``rate_mbit``, each direction; ``up_mbit``
caps the upload alone, as on most home links) and a one-way delay (``delay_ms``, each
direction). A packet from site S to site T is delayed by
``delay(S) + delay(T)``, so the round trip is ``2 * (delay(S) + delay(T))``.

Addresses (all inside the benchmarking range 198.18.0.0/15): site ``i`` gets
``198.18.0.{i+1}/24`` on the internet segment; the ``k``-th NAT's LAN is ``198.19.{k}.0/24``
with the router at ``.1`` and its hosts from ``.2``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from shoal.errors import ConfigError

__all__ = [
    "AddressPlan",
    "HostAddress",
    "Nat",
    "Public",
    "Site",
    "Topology",
    "load_topology",
    "plan_addresses",
]

INTERNET_NET = "198.18.0.0/24"
MAX_SITES = 200
MAX_LAN_HOSTS = 200
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,15}$")


def _check_link(name: str, rate_mbit: float | None, up_mbit: float | None, delay_ms: float) -> None:
    for field_name, rate in (("rate_mbit", rate_mbit), ("up_mbit", up_mbit)):
        if rate is not None and not 0.01 <= rate <= 10_000:
            raise ConfigError(f"{name}.{field_name} must be in [0.01, 10000] or None, got {rate!r}")
    if not 0 <= delay_ms <= 10_000:
        raise ConfigError(f"{name}.delay_ms must be in [0, 10000], got {delay_ms!r}")


@dataclass(kw_only=True, slots=True, frozen=True)
class Public:
    """A host with a public address on the internet segment."""

    name: str
    rate_mbit: float | None = None
    """Access link cap in Mbit/s, each direction; None = unshaped."""
    up_mbit: float | None = None
    """Upload cap in Mbit/s, in place of ``rate_mbit`` for that direction; None = as
    ``rate_mbit``."""
    delay_ms: float = 0.0
    """Access link one-way delay in ms, each direction."""

    def __post_init__(self) -> None:
        _check_link(self.name, self.rate_mbit, self.up_mbit, self.delay_ms)


@dataclass(kw_only=True, slots=True, frozen=True)
class Nat:
    """A home router (MASQUERADE) with ``hosts`` on its private LAN."""

    name: str
    kind: Literal["cone", "symmetric"] = "cone"
    hosts: Sequence[str] = ()
    rate_mbit: float | None = None
    """WAN link cap in Mbit/s, each direction; None = unshaped."""
    up_mbit: float | None = None
    """Upload cap in Mbit/s, in place of ``rate_mbit`` for that direction; None = as
    ``rate_mbit``."""
    delay_ms: float = 0.0
    """WAN link one-way delay in ms, each direction."""

    def __post_init__(self) -> None:
        if self.kind not in ("cone", "symmetric"):
            raise ConfigError(f"{self.name}.kind must be 'cone' or 'symmetric', got {self.kind!r}")
        if not isinstance(self.hosts, tuple):
            object.__setattr__(self, "hosts", tuple(self.hosts))
        if not 1 <= len(self.hosts) <= MAX_LAN_HOSTS:
            raise ConfigError(
                f"{self.name}.hosts must hold 1..{MAX_LAN_HOSTS} names, got {self.hosts!r}"
            )
        _check_link(self.name, self.rate_mbit, self.up_mbit, self.delay_ms)


Site = Public | Nat


@dataclass(kw_only=True, slots=True, frozen=True)
class Topology:
    """Sites on one internet segment; every site and LAN host name is unique."""

    hosts: Sequence[Site]

    def __post_init__(self) -> None:
        if not isinstance(self.hosts, tuple):
            object.__setattr__(self, "hosts", tuple(self.hosts))
        if not 1 <= len(self.hosts) <= MAX_SITES:
            raise ConfigError(f"hosts must hold 1..{MAX_SITES} sites, got {len(self.hosts)}")
        seen: set[str] = set()
        for site in self.hosts:
            names = [site.name, *(site.hosts if isinstance(site, Nat) else ())]
            for name in names:
                if not _NAME.match(name):
                    raise ConfigError(f"host name must match {_NAME.pattern}, got {name!r}")
                if name in seen:
                    raise ConfigError(f"host name {name!r} is used twice")
                seen.add(name)


@dataclass(kw_only=True, slots=True, frozen=True)
class HostAddress:
    """Where one endpoint or router sits."""

    name: str
    site: str
    """The site whose access link this host uses (itself for public hosts and routers)."""
    address: str
    """The host's own address."""
    public_address: str
    """What hosts on the internet see: its own address, or its router's WAN address."""
    prefix_len: int
    gateway: str | None
    """Default gateway (the router's LAN address) for hosts behind a NAT."""
    role: Literal["public", "router", "lan"]


@dataclass(kw_only=True, slots=True)
class AddressPlan:
    hosts: dict[str, HostAddress] = field(default_factory=dict)
    lan_of: dict[str, str] = field(default_factory=dict)
    """NAT name -> its LAN network (CIDR)."""
    site_delay_ms: dict[str, float] = field(default_factory=dict)

    def delay_map_ms(self, host: str) -> tuple[float, dict[str, float]]:
        """(default delay, {public address: delay}) for packets ``host`` sends to other sites."""
        mine = self.site_delay_ms[self.hosts[host].site]
        per_dst = {
            h.address: mine + self.site_delay_ms[h.site]
            for h in self.hosts.values()
            if h.role in ("public", "router") and h.site != self.hosts[host].site
        }
        return mine, per_dst


def plan_addresses(topology: Topology) -> AddressPlan:
    """Assign every host its addresses (see the module docstring for the scheme)."""
    plan = AddressPlan()
    nat_index = 0
    for i, site in enumerate(topology.hosts):
        wan = f"198.18.0.{i + 1}"
        plan.site_delay_ms[site.name] = site.delay_ms
        if isinstance(site, Public):
            plan.hosts[site.name] = HostAddress(
                name=site.name, site=site.name, address=wan, public_address=wan,
                prefix_len=24, gateway=None, role="public",
            )  # fmt: skip
            continue
        lan = f"198.19.{nat_index}"
        nat_index += 1
        plan.lan_of[site.name] = f"{lan}.0/24"
        plan.hosts[site.name] = HostAddress(
            name=site.name, site=site.name, address=wan, public_address=wan,
            prefix_len=24, gateway=None, role="router",
        )  # fmt: skip
        for j, host in enumerate(site.hosts):
            plan.hosts[host] = HostAddress(
                name=host, site=site.name, address=f"{lan}.{j + 2}", public_address=wan,
                prefix_len=24, gateway=f"{lan}.1", role="lan",
            )  # fmt: skip
    return plan


def load_topology(path: str | Path) -> Topology:
    """Read a topology from TOML: ``[[public]]`` and ``[[nat]]`` tables, in file order per kind.

    Example::

        [[public]]
        name = "relay"
        delay_ms = 10

        [[nat]]
        name = "home1"
        kind = "cone"
        hosts = ["a"]
        rate_mbit = 20
    """
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read topology {path}: {exc}") from exc
    unknown = set(data) - {"public", "nat"}
    if unknown:
        raise ConfigError(f"topology {path}: unknown tables {sorted(unknown)}")
    sites: list[Site] = []
    try:
        sites.extend(Public(**entry) for entry in data.get("public", []))
        sites.extend(
            Nat(**{**entry, "hosts": tuple(entry.get("hosts", ()))})
            for entry in data.get("nat", [])
        )
    except TypeError as exc:
        raise ConfigError(f"topology {path}: {exc}") from exc
    return Topology(hosts=tuple(sites))
