"""Compile every ``proto/shoal/v1/*.proto`` into committed Python code.

Run ``python -m shoal.net.protogen`` (or ``make proto``) after editing a ``.proto`` file;
``python -m shoal.net.protogen --check`` exits 1 when the committed code is stale (a test
runs the same check). Output lands in ``src/shoal/net/proto/v1/`` as ``<name>_pb2.py``,
``<name>_pb2.pyi`` and ``<name>_pb2_grpc.py``, importable as
``from shoal.net.proto.v1 import peer_pb2``. protoc writes imports for the package path
``shoal.v1``; they are rewritten to ``shoal.net.proto.v1``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_PACKAGE_DIR = Path("shoal") / "v1"
OUT_DIR = Path(__file__).resolve().parent / "proto" / "v1"
PYTHON_PACKAGE = "shoal.net.proto.v1"

_INIT_TEXT = '"""Generated from proto/shoal/v1 by shoal.net.protogen; do not edit."""\n'
_IMPORT_RE = re.compile(r"^(from|import) shoal\.v1(\b)", re.MULTILINE)


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every ``.proto`` under ``proto/shoal/v1``, sorted, relative to ``proto_root``."""
    folder = proto_root / PROTO_PACKAGE_DIR
    return sorted(p.relative_to(proto_root) for p in folder.glob("*.proto"))


def _rewrite_imports(text: str) -> str:
    return _IMPORT_RE.sub(lambda m: f"{m.group(1)} {PYTHON_PACKAGE}", text)


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Compile every proto into ``out_dir`` (created, emptied of stale files); return files.

    Raises:
        RuntimeError: protoc failed; the message carries its exit status.
    """
    import grpc_tools
    from grpc_tools import protoc

    files = proto_files(proto_root)
    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory(prefix="shoal-protogen-") as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(f) for f in files),
        ]
        status = protoc.main(args)
        if status != 0:
            raise RuntimeError(f"protoc failed with status {status}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in out_dir.iterdir():
            if old.is_file() and old.suffix in (".py", ".pyi"):
                old.unlink()
        written = []
        for src in sorted((Path(tmp) / PROTO_PACKAGE_DIR).iterdir()):
            dst = out_dir / src.name
            dst.write_text(_rewrite_imports(src.read_text()))
            written.append(dst)
    init = out_dir / "__init__.py"
    init.write_text(_INIT_TEXT)
    parent_init = out_dir.parent / "__init__.py"
    if not parent_init.exists():
        parent_init.write_text(_INIT_TEXT)
    return [init, *written]


def stale_files(out_dir: Path = OUT_DIR, proto_root: Path = PROTO_ROOT) -> list[str]:
    """Names of generated files that differ from a fresh compile (missing, extra or changed)."""
    with tempfile.TemporaryDirectory(prefix="shoal-protocheck-") as tmp:
        fresh_dir = Path(tmp) / "v1"
        generate(fresh_dir, proto_root)
        fresh = {p.name: p.read_bytes() for p in fresh_dir.iterdir() if p.is_file()}
    committed = {
        p.name: p.read_bytes()
        for p in (out_dir.iterdir() if out_dir.is_dir() else [])
        if p.is_file() and p.suffix in (".py", ".pyi")
    }
    names = sorted(set(fresh) | set(committed))
    return [n for n in names if fresh.get(n) != committed.get(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoal.net.protogen", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 when generated code is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated code (run `make proto`): " + ", ".join(stale), file=sys.stderr)
            return 1
        return 0
    for path in generate(OUT_DIR):
        print(path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["OUT_DIR", "generate", "main", "proto_files", "stale_files"]
