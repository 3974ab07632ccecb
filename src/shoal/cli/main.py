"""The `shoal` command: a thin typer shell over the layers below.

Each subcommand lives in its own module ``shoal.cli.<name>`` that exposes
``register(app)``. Modules are imported lazily only when present, so the command works
while layers are still being built, and ``shoal --help`` stays fast.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting for work starve every other process on a shared or
# oversubscribed machine (a local swarm runs several peers per core): one tiny-model step went
# from ~2 s to ~30 s. The setting only takes effect before torch is first imported, so it is
# made here, ahead of every subcommand import; an explicit value in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib
import sys

import typer

from shoal.errors import ShoalError

# Subcommand modules, in the order `shoal --help` lists them.
_COMMANDS = ("demo", "peer", "train", "monitor", "dht", "testbed", "bench")

app = typer.Typer(
    name="shoal",
    help="Train one model on a swarm of unreliable computers joined by slow links.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Train one model on a swarm of unreliable computers joined by slow links."""


_registered = False


def _register_all() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    for name in _COMMANDS:
        module_name = f"shoal.cli.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.register(app)


def main(argv: list[str] | None = None) -> int:
    """Console entry point. Shoal's own errors print one line and exit 2.

    Usage errors (unknown command, missing argument) are reported by the command-line
    parser itself, which prints the usage and exits 2.
    """
    _register_all()
    try:
        app(args=argv, standalone_mode=True)
    except ShoalError as exc:
        print(f"shoal: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
