import dataclasses

import pytest
import torch

from shoal.errors import CheckpointError
from shoal.state.checkpoint import list_checkpoints, load_latest_valid
from shoal.train.run_state import checkpoint_root, restore_run
from shoal.train.trainer import Trainer


def _losses(summary):
    return [r.train_loss for r in summary.history]


def test_resume_is_bit_exact(small_cfg):
    straight = Trainer(small_cfg(**{"run.run_dir": "unused"}), show_progress=False, log_lines=False)
    full = straight.run()
    assert full.steps == 20

    cfg = small_cfg(**{"checkpoint.every_steps": 10})
    first = Trainer(cfg, show_progress=False, log_lines=False)
    part1 = first.run(until=10)
    assert [p.name for p in list_checkpoints(checkpoint_root(cfg.run.run_dir))] == ["step-00000010"]
    torch.manual_seed(1234)  # disturb the global RNG: resume must restore it
    second = Trainer(cfg, show_progress=False, log_lines=False)
    assert second.resume()
    assert second.step == 10
    part2 = second.run()

    assert _losses(part1) + _losses(part2) == _losses(full)
    for a, b in zip(straight.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert part2.val_bpb == full.val_bpb


def test_resume_without_checkpoint_starts_at_zero(small_cfg):
    trainer = Trainer(small_cfg(), show_progress=False, log_lines=False)
    assert not trainer.resume()
    assert trainer.step == 0


def test_resume_skips_a_corrupt_newest_checkpoint(small_cfg):
    cfg = small_cfg(**{"checkpoint.every_steps": 5, "run.steps": 10})
    Trainer(cfg, show_progress=False, log_lines=False).run()
    newest = list_checkpoints(checkpoint_root(cfg.run.run_dir))[-1]
    (newest / "optimizer.safetensors").write_bytes(b"x")
    again = Trainer(cfg, show_progress=False, log_lines=False)
    assert again.resume()
    assert again.step == 5


@pytest.mark.parametrize("meta", [{"config": None}, {"data": [1]}, {"batches_drawn": "x"}])
def test_a_checkpoint_with_meta_no_run_writes_is_refused_before_loading(small_cfg, meta):
    # A donor's snapshot restores through here too (recovery_peer): int() of its meta
    # raised out of the restore, after the model had been loaded.
    cfg = small_cfg(**{"checkpoint.every_steps": 5, "run.steps": 5})
    Trainer(cfg, show_progress=False, log_lines=False).run()
    ckpt = load_latest_valid(checkpoint_root(cfg.run.run_dir))
    assert ckpt is not None
    if "batches_drawn" in meta:
        meta = {"data": {**ckpt.meta["data"], **meta}}
    ckpt = dataclasses.replace(ckpt, meta={**ckpt.meta, **meta})
    fresh = Trainer(cfg, show_progress=False, log_lines=False)
    before = [p.clone() for p in fresh.model.parameters()]
    config = {"model_shape": fresh.model_cfg.to_dict()}
    with pytest.raises(CheckpointError, match="meta"):
        restore_run(ckpt, fresh.model, fresh.optimizer, fresh.windows, config)
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.parameters(), before, strict=True))


@pytest.mark.parametrize("key", ["rng.torch_cpu", "data.generator"])
def test_a_checkpoint_with_a_generator_state_no_run_writes_is_refused_before_loading(
    small_cfg, key
):
    # set_rng_state raised TypeError out of the restore, after the model had been loaded.
    cfg = small_cfg(**{"checkpoint.every_steps": 5, "run.steps": 5})
    Trainer(cfg, show_progress=False, log_lines=False).run()
    ckpt = load_latest_valid(checkpoint_root(cfg.run.run_dir))
    assert ckpt is not None
    ckpt = dataclasses.replace(ckpt, extra={**ckpt.extra, key: torch.zeros(3)})
    fresh = Trainer(cfg, show_progress=False, log_lines=False)
    before = [p.clone() for p in fresh.model.parameters()]
    config = {"model_shape": fresh.model_cfg.to_dict()}
    with pytest.raises(CheckpointError, match=f"{key} is not a generator state"):
        restore_run(ckpt, fresh.model, fresh.optimizer, fresh.windows, config)
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.parameters(), before, strict=True))
