"""`shoal testbed up / exec / down` by hand (the typer app, in-process: no torch import)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoal.cli import testbed as cli_testbed

pytestmark = pytest.mark.netns

TOPOLOGY = '[[public]]\nname = "relay"\ndelay_ms = 5\n\n[[nat]]\nname = "home1"\nhosts = ["a"]\n'


def shoal(*args: str) -> tuple[int, str]:
    outcome = CliRunner().invoke(cli_testbed.testbed_app, list(args))
    if outcome.exception is not None and not isinstance(outcome.exception, SystemExit):
        code = 2  # what `shoal` prints and returns for its own errors
    else:
        code = outcome.exit_code
    return code, outcome.stdout


def test_up_exec_down(netns_ok: None, tmp_path: Path) -> None:
    topology, state, out = tmp_path / "t.toml", str(tmp_path / "state.json"), tmp_path / "out"
    topology.write_text(TOPOLOGY)
    code, stdout = shoal("up", str(topology), "--state", state)
    assert code == 0, stdout
    hosts = json.loads(stdout)["hosts"]
    try:
        assert shoal("up", str(topology), "--state", state)[0] == 2  # already up
        cmd = f"ip -br addr > {out}"
        assert shoal("exec", "a", "--state", state, "--", "sh", "-c", cmd)[0] == 0
        assert hosts["a"]["address"] in out.read_text()
        assert shoal("exec", "a", "--state", state, "--", "sh", "-c", "exit 3")[0] == 3
        assert shoal("exec", "nobody", "--state", state, "--", "true")[0] == 2
    finally:
        down_code, _ = shoal("down", "--state", state)
    assert down_code == 0
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert all(h["netns"] not in names for h in hosts.values())
    assert shoal("down", "--state", state)[0] == 2  # nothing left to take down
