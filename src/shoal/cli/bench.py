"""`shoal bench NAME [ARGS...]`: run the benchmark ``bench/NAME.py`` from the source tree.

Every benchmark module defines ``main(argv: list[str]) -> dict`` that measures Shoal and
its baseline in the same run and returns the result; this command prints it as one JSON
line (benchmarks may print progress to stderr only).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import typer

from shoal.errors import ConfigError


def bench_dir() -> Path:
    """The repository's ``bench/`` folder (Shoal runs benchmarks from its source tree)."""
    return Path(__file__).resolve().parents[3] / "bench"


def available() -> list[str]:
    folder = bench_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def run_bench(name: str, argv: list[str]) -> dict:
    path = bench_dir() / f"{name}.py"
    if not path.is_file():
        names = ", ".join(available()) or "none found"
        raise ConfigError(f"unknown benchmark {name!r}; available: {names}")
    spec = importlib.util.spec_from_file_location(f"shoal_bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(argv)
    if not isinstance(result, dict):
        raise TypeError(f"bench/{name}.py main() returned {type(result).__name__}, not dict")
    return result


def register(app: typer.Typer) -> None:
    @app.command(
        "bench",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    def bench(
        ctx: typer.Context,
        name: str = typer.Argument(..., help="Benchmark name (a file in bench/)."),
    ) -> None:
        """Run a benchmark and print its result as one JSON line."""
        result = run_bench(name, list(ctx.args))
        sys.stdout.write(json.dumps(result, sort_keys=False) + "\n")
        sys.stdout.flush()
