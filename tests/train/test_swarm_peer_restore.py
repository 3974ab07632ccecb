"""Where a restarting shoal peer continues from when a checkpoint does not fit."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.errors import ConfigError
from shoal.state.checkpoint import load_latest_valid, write_snapshot
from shoal.state.recovery import Recovered, Source
from shoal.train.run_state import checkpoint_root
from shoal.train.swarm_config import PeerOptions
from shoal.train.swarm_peer import _restore, build_trainer
from shoal.train.swarm_state import snapshot_peer


def _checkpoint(opts: PeerOptions, step: int, root: Path):
    trainer = build_trainer(opts, 7)
    snap = snapshot_peer(
        step,
        trainer.model,
        trainer.optimizer,
        trainer.windows,
        strategy={},
        round_index=3,
        mode=opts.mode,
        model_shape=trainer.model_cfg.to_dict(),
        data_seed=7,
    )
    write_snapshot(snap, root)
    return load_latest_valid(root)


def test_a_run_dir_of_another_mode_is_refused_not_silently_started_over(tmp_path: Path) -> None:
    # Starting from step 0 there used to rotate the run dir's checkpoints away one by one.
    opts = PeerOptions(mode="sync", run_dir=tmp_path)
    own = _checkpoint(opts, 40, checkpoint_root(tmp_path))
    diloco = PeerOptions(mode="diloco", run_dir=tmp_path)
    trainer = build_trainer(diloco, 7)
    found = Recovered(Source.DISK, own, 40, None)
    with pytest.raises(ConfigError, match=r"cannot continue from .*mode 'sync'.*--run-dir"):
        _restore(found, diloco, trainer, trainer.model_cfg.to_dict(), 7)


def test_a_swarm_snapshot_that_does_not_fit_falls_back_to_our_own(tmp_path: Path) -> None:
    opts = PeerOptions(mode="diloco", run_dir=tmp_path / "me")
    _checkpoint(opts, 20, checkpoint_root(opts.run_dir))
    wide = PeerOptions(mode="diloco", run_dir=tmp_path / "other", model_overrides={"d_model": 96})
    theirs = _checkpoint(wide, 60, tmp_path / "other")
    trainer = build_trainer(opts, 7)
    found = Recovered(Source.SWARM, theirs, 20, 60)
    source, restored = _restore(found, opts, trainer, trainer.model_cfg.to_dict(), 7)
    assert source is Source.DISK and restored is not None and restored.step == 20
