"""The JSON manifest that describes one checkpoint directory.

``manifest.json`` is written last inside the temporary directory, so a checkpoint without a
readable manifest is incomplete by construction. It records the step, free-form JSON
metadata (run config, data position, optimizer scalars) and, for every data file, its size
and sha256 so readers detect torn or corrupted files before parsing them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.errors import CheckpointError

__all__ = ["FORMAT", "MANIFEST_NAME", "FileEntry", "Manifest", "sha256_hex"]

FORMAT = "shoal-checkpoint/1"
MANIFEST_NAME = "manifest.json"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, kw_only=True, slots=True)
class FileEntry:
    """One data file of a checkpoint."""

    bytes: int
    sha256: str


@dataclass(kw_only=True, slots=True)
class Manifest:
    """Contents of ``manifest.json``."""

    step: int
    files: dict[str, FileEntry] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def to_json(self) -> str:
        doc = {
            "format": self.format,
            "step": self.step,
            "files": {k: {"bytes": v.bytes, "sha256": v.sha256} for k, v in self.files.items()},
            "meta": self.meta,
        }
        return json.dumps(doc, indent=1, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """Parse ``path``.

        Raises:
            CheckpointError: missing, unparseable or of an unknown format (names the file).
        """
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc["format"] != FORMAT:
                raise CheckpointError(
                    f"checkpoint manifest {path} has format {doc['format']!r}, expected {FORMAT!r}"
                )
            files = {
                str(name): FileEntry(bytes=int(e["bytes"]), sha256=str(e["sha256"]))
                for name, e in doc["files"].items()
            }
            return cls(step=int(doc["step"]), files=files, meta=dict(doc["meta"]))
        except CheckpointError:
            raise
        except FileNotFoundError as exc:
            raise CheckpointError(f"checkpoint manifest {path} is missing") from exc
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"checkpoint manifest {path} is unreadable: {exc}") from exc
