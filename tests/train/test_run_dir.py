"""A peer's run dir: one peer at a time, clear errors for unusable paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shoal.errors import ConfigError
from shoal.train.run_dir import claim_run_dir


def test_a_run_dir_is_held_by_one_peer_at_a_time(tmp_path: Path) -> None:
    # Two peers in one run dir shared its key: same PeerID, same data, never averaging.
    run = tmp_path / "peer"
    with claim_run_dir(run):
        assert (run / "lock").read_text() == str(os.getpid())
        with (
            pytest.raises(ConfigError, match=f"in use by pid {os.getpid()}"),
            claim_run_dir(run),
        ):
            pass
    with claim_run_dir(run):  # released when the first one ended
        pass


def test_a_run_dir_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"), claim_run_dir(afile):
        pass
    with pytest.raises(ConfigError, match="not a directory"), claim_run_dir(afile / "below"):
        pass
