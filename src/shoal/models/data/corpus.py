"""Byte corpora: the embedded standard-library data set, or a directory of text files.

The default data set is the running Python's standard library (``*.py`` under
``sysconfig.get_paths()["stdlib"]``), always present, no download. We skip
``site-packages`` (third-party code that differs between machines), ``__pycache__`` and the
test suites (``test``, ``tests``, ``idle_test``: large, repetitive and unlike ordinary code),
which keeps the corpus around 12 MB and loading under a second.

Files are assigned to train or validation by a hash of their relative path (sha256, so the
split is the same on every machine and independent of file order); each split is the
concatenation of its files in sorted path order, each followed by a newline. If hashing
leaves one split empty (tiny user directories), the corpus is split by bytes instead: the
last ``val_fraction`` of the concatenation is validation.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from shoal.errors import ConfigError, DataError

__all__ = ["SKIPPED_DIRS", "Corpus", "is_validation", "load_corpus", "stdlib_dir"]

SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
"""Directory names never descended into when collecting files."""

_TEXT_SUFFIXES = frozenset({".txt", ".md", ".py", ".rst", ".json", ".toml", ".csv", ".c", ".h"})


@dataclass(frozen=True, slots=True)
class Corpus:
    """Train and validation bytes as 1-D uint8 tensors."""

    train: torch.Tensor
    val: torch.Tensor
    source: str
    """Where the bytes came from: ``"stdlib"`` or the directory path."""
    num_files: int


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_validation(relpath: str, val_fraction: float) -> bool:
    """Whether the file at ``relpath`` (POSIX separators) belongs to the validation split."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    return bucket < val_fraction


def _collect(root: Path, suffixes: frozenset[str] | None) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            if suffixes is not None and Path(name).suffix not in suffixes:
                continue
            path = Path(dirpath) / name
            found.append((path.relative_to(root).as_posix(), path))
    found.sort()
    return found


def load_corpus(data_dir: str | Path | None = None, *, val_fraction: float = 0.015) -> Corpus:
    """Load the stdlib corpus (``data_dir=None``) or the text files under ``data_dir``.

    For a user directory every regular file with a text suffix (``.txt``, ``.md``, ``.py``,
    ...) is used; other files are ignored.

    Raises:
        ConfigError: ``val_fraction`` outside (0, 0.5].
        DataError: the directory is missing, or holds no usable bytes.
    """
    if not 0.0 < val_fraction <= 0.5:
        raise ConfigError(f"data.val_fraction must be in (0, 0.5], got {val_fraction!r}")
    if data_dir is None:
        root, suffixes, source = stdlib_dir(), frozenset({".py"}), "stdlib"
    else:
        root, suffixes, source = Path(data_dir), _TEXT_SUFFIXES, str(data_dir)
        if not root.is_dir():
            raise DataError(f"data directory {str(root)!r} does not exist or is not a directory")
    files = _collect(root, suffixes)
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
    for rel, path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read data file {str(path)!r}: {exc}") from exc
        if not data:
            continue
        (val_parts if is_validation(rel, val_fraction) else train_parts).append(data + b"\n")
    train, val = b"".join(train_parts), b"".join(val_parts)
    if not train and not val:
        names = ", ".join(sorted(_TEXT_SUFFIXES))
        raise DataError(f"data directory {str(root)!r} holds no non-empty text files ({names})")
    if not train or not val:
        whole = train + val
        cut = len(whole) - max(1, int(len(whole) * val_fraction))
        train, val = whole[:cut], whole[cut:]
    return Corpus(
        train=torch.frombuffer(bytearray(train), dtype=torch.uint8),
        val=torch.frombuffer(bytearray(val), dtype=torch.uint8),
        source=source,
        num_files=len(files),
    )
