"""Topology validation, address plan, delay map and TOML loading (pure, no root needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.errors import ConfigError
from shoal.testbed.topology import Nat, Public, Topology, load_topology, plan_addresses


def topo() -> Topology:
    return Topology(
        hosts=[
            Public(name="relay", delay_ms=10),
            Nat(name="home1", hosts=["a", "b"], delay_ms=30, rate_mbit=20),
            Nat(name="home2", kind="symmetric", hosts=["c"]),
        ]
    )


def test_address_plan_stays_in_the_benchmarking_range() -> None:
    plan = plan_addresses(topo())
    assert plan.hosts["relay"].address == "198.18.0.1"
    assert plan.hosts["home1"].address == "198.18.0.2"
    assert plan.hosts["a"].address == "198.19.0.2" and plan.hosts["b"].address == "198.19.0.3"
    assert plan.hosts["a"].gateway == "198.19.0.1"
    assert plan.hosts["a"].public_address == plan.hosts["home1"].address
    assert plan.hosts["c"].address == "198.19.1.2"
    assert plan.lan_of == {"home1": "198.19.0.0/24", "home2": "198.19.1.0/24"}
    for host in plan.hosts.values():
        first, second = (int(x) for x in host.address.split(".")[:2])
        assert (first, second) in ((198, 18), (198, 19))


def test_delay_map_sums_both_sites() -> None:
    plan = plan_addresses(topo())
    default, per_dst = plan.delay_map_ms("a")
    assert default == 30
    assert per_dst == {"198.18.0.1": 40, "198.18.0.3": 30}  # relay 30+10, home2 30+0
    default, per_dst = plan.delay_map_ms("relay")
    assert per_dst == {"198.18.0.2": 40, "198.18.0.3": 10}


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: Topology(hosts=[Public(name="x"), Nat(name="x", hosts=["y"])]), "used twice"),
        (lambda: Topology(hosts=[Public(name="Bad-Name")]), "host name"),
        (lambda: Topology(hosts=[]), "hosts"),
        (lambda: Nat(name="n", hosts=[]), "n.hosts"),
        (lambda: Nat(name="n", kind="full", hosts=["a"]), "n.kind"),  # type: ignore[arg-type]
        (lambda: Public(name="p", rate_mbit=0), "p.rate_mbit"),
        (lambda: Nat(name="n", hosts=["a"], up_mbit=20_000), "n.up_mbit"),
        (lambda: Public(name="p", delay_ms=-1), "p.delay_ms"),
    ],
)
def test_invalid_topologies_are_rejected(make, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        make()


def test_load_topology_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        '[[public]]\nname = "relay"\ndelay_ms = 10\n\n'
        '[[nat]]\nname = "home1"\nkind = "symmetric"\nhosts = ["a"]\nrate_mbit = 5\n'
        "up_mbit = 1\n"
    )
    loaded = load_topology(path)
    assert loaded.hosts == (
        Public(name="relay", delay_ms=10),
        Nat(name="home1", kind="symmetric", hosts=("a",), rate_mbit=5, up_mbit=1),
    )
    path.write_text('[[router]]\nname = "x"\n')
    with pytest.raises(ConfigError, match="unknown tables"):
        load_topology(path)
    path.write_text('[[public]]\nname = "x"\ncolour = "red"\n')
    with pytest.raises(ConfigError, match="colour"):
        load_topology(path)
