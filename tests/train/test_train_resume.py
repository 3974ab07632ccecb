import torch

from shoal.state.checkpoint import list_checkpoints
from shoal.train.run_state import checkpoint_root
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
