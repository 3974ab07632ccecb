"""`shoal testbed up FILE.toml | exec HOST -- CMD... | down`: a namespace testbed by hand.

``up`` builds a persistent testbed (it outlives the command) and writes its record to a
state file; ``exec`` and ``down`` find it there. Needs root.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import typer

from shoal.errors import ConfigError
from shoal.testbed import Testbed, TestbedConfig, load_topology
from shoal.testbed.netns import list_netns, netns_exec_argv
from shoal.testbed.registry import Record, read_record, remove_run

__all__ = ["register"]

DEFAULT_STATE = Path("/run/shoal-testbed/cli-state.json")
_STATE_OPT = typer.Option(DEFAULT_STATE, "--state", help="State file written by `up`.")
_TOPOLOGY_ARG = typer.Argument(..., help="Topology TOML ([[public]] and [[nat]] tables).")
_HOST_ARG = typer.Argument(..., help="Host name from the topology.")

testbed_app = typer.Typer(
    help="Build network-namespace topologies by hand (needs root).", no_args_is_help=True
)


def _load_state(state: Path) -> Record:
    record = read_record(state)
    if record is None:
        raise ConfigError(f"no testbed state at {state} (run `shoal testbed up` first)")
    return record


@testbed_app.command("up")
def up(
    topology: Path = _TOPOLOGY_ARG,
    state: Path = _STATE_OPT,
) -> None:
    """Build the topology and leave it running; print its hosts as JSON."""
    old = read_record(state)
    if old is not None and set(old.namespaces) & set(list_netns()):
        raise ConfigError(
            f"testbed {old.prefix} from {state} is still up; run `shoal testbed down`"
        )
    bed = Testbed(load_topology(topology), TestbedConfig(persistent=True))
    bed.up()
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(Path(TestbedConfig().state_dir / f"{bed.prefix}.json").read_text())
    print(json.dumps(bed.describe(), indent=1))


@testbed_app.command(
    "exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def exec_(
    ctx: typer.Context,
    host: str = _HOST_ARG,
    state: Path = _STATE_OPT,
) -> None:
    """Run a command inside HOST's network namespace: shoal testbed exec HOST -- CMD..."""
    record = _load_state(state)
    if host not in record.hosts:
        raise ConfigError(f"unknown host {host!r}; hosts: {', '.join(sorted(record.hosts))}")
    argv = list(ctx.args)
    if not argv:
        raise ConfigError("no command given: shoal testbed exec HOST -- CMD...")
    sys.exit(subprocess.call(netns_exec_argv(record.hosts[host]["netns"], argv)))


@testbed_app.command("down")
def down(
    state: Path = _STATE_OPT,
) -> None:
    """Stop the testbed's processes and delete its namespaces."""
    record = _load_state(state)
    remove_run(TestbedConfig().state_dir, record)
    state.unlink(missing_ok=True)
    print(f"removed testbed {record.prefix}", file=sys.stderr)


def register(app: typer.Typer) -> None:
    app.add_typer(testbed_app, name="testbed")
