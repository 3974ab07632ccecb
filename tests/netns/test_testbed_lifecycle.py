"""Testbed lifecycle: nothing with the prefix survives teardown, a failed build, or a dead run."""

from __future__ import annotations

import os
import subprocess

import pytest

import shoal.testbed.bed as bed_module
from shoal.testbed import Nat, Public, Testbed, TestbedConfig, TestbedError, Topology
from shoal.testbed.registry import Record, new_prefix, process_start_time, write_record

pytestmark = pytest.mark.netns


def leftovers(prefix: str) -> list[str]:
    """Namespaces, root-namespace links and root iptables rules that mention ``prefix``."""
    found = []
    for argv in (["ip", "netns", "list"], ["ip", "-o", "link"], ["iptables-save"]):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout
        found += [line for line in out.splitlines() if prefix in line]
    return found


def small() -> Topology:
    return Topology(
        hosts=[Public(name="p1", delay_ms=5), Nat(name="h1", hosts=["x"], rate_mbit=10)]
    )


STATE_DIR = TestbedConfig().state_dir  # one registry for every run, so runs respect each other


def test_teardown_removes_every_namespace_link_and_rule(netns_ok: None) -> None:
    with Testbed(small()) as bed:
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert sum(bed.prefix in line for line in names.splitlines()) == 4  # inet, p1, h1, x
        assert (STATE_DIR / f"{bed.prefix}.json").exists()
        rules = bed.hosts["h1"].exec(["iptables-save"]).stdout
        assert "MASQUERADE" in rules and "ESTABLISHED" in rules
        assert "tbf" in bed.hosts["h1"].exec(["tc", "qdisc"]).stdout
    assert leftovers(bed.prefix) == []
    assert not (STATE_DIR / f"{bed.prefix}.json").exists()
    bed.down()  # idempotent


def test_failed_build_removes_what_it_built(
    netns_ok: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = bed_module.build_topology

    def build_then_fail(bed: Testbed) -> None:
        real(bed)
        raise TestbedError("injected failure after the build")

    monkeypatch.setattr(bed_module, "build_topology", build_then_fail)
    bed = Testbed(small())
    with pytest.raises(TestbedError, match="injected"):
        bed.up()
    assert leftovers(bed.prefix) == []


def test_leftovers_of_dead_runs_are_removed_at_start(netns_ok: None) -> None:
    dead, orphan, alive = new_prefix(), new_prefix(), new_prefix()
    # ``dead`` names an owner that does not exist, ``orphan`` has no record at all,
    # ``alive`` is owned by this very process (records first, as a testbed does)
    write_record(STATE_DIR, Record(prefix=dead, pid=2**22 + 1, start_time=1))
    me = os.getpid()
    write_record(STATE_DIR, Record(prefix=alive, pid=me, start_time=process_start_time(me)))
    for prefix in (dead, orphan, alive):
        subprocess.run(["ip", "netns", "add", f"{prefix}zombie"], check=True, timeout=10)
    try:
        with Testbed(Topology(hosts=[Public(name="p1")])):
            assert leftovers(dead) == [] and leftovers(orphan) == []
            assert not (STATE_DIR / f"{dead}.json").exists()
            assert leftovers(alive) != []
    finally:
        subprocess.run(["ip", "netns", "del", f"{alive}zombie"], check=False, timeout=10)
        (STATE_DIR / f"{alive}.json").unlink(missing_ok=True)
    assert leftovers(alive) == []
