import itertools
import math

import pytest
import torch

from shoal.errors import CheckpointError
from shoal.train.schedule import warmup_cosine
from shoal.train.trainer import Trainer


def test_loss_goes_down_and_summary_is_complete(small_cfg):
    trainer = Trainer(small_cfg(**{"run.steps": 30}), show_progress=False, log_lines=False)
    summary = trainer.run()
    losses = [r.train_loss for r in summary.history]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    evals = [r.step for r in summary.history if r.val_bpb is not None]
    assert evals == [5, 10, 15, 20, 25, 30]
    assert summary.val_bpb < 8.0 and summary.tokens_per_s > 0
    assert summary.params == trainer.model.num_params()


def test_grad_accumulation_matches_a_bigger_batch(small_cfg):
    big = Trainer(small_cfg(**{"data.batch_size": 8}), show_progress=False, log_lines=False)
    accum = Trainer(
        small_cfg(**{"data.batch_size": 4, "optim.grad_accum": 2}),
        show_progress=False,
        log_lines=False,
    )
    # same windows: the big batch is the concatenation of the two micro-batches
    xa, ya = accum.windows.next_batch()
    xb, yb = accum.windows.next_batch()
    big.windows.next_batch = lambda: (torch.cat([xa, xb]), torch.cat([ya, yb]))
    accum_batches = iter([(xa, ya), (xb, yb)])
    accum.windows.next_batch = lambda: next(accum_batches)
    _, loss_big = big.train_step()
    _, loss_acc = accum.train_step()
    assert math.isclose(float(loss_big), float(loss_acc), rel_tol=1e-5)
    for p, q in zip(big.model.parameters(), accum.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_checkpoint_of_another_model_is_refused(small_cfg):
    cfg = small_cfg(**{"checkpoint.every_steps": 5, "run.steps": 5})
    Trainer(cfg, show_progress=False, log_lines=False).run()
    other = small_cfg(**{"checkpoint.every_steps": 5, "model.d_model": 64})
    with pytest.raises(CheckpointError, match="written for model"):
        Trainer(other, show_progress=False, log_lines=False).resume()


def test_warmup_cosine_shape():
    kw = {"base_lr": 1.0, "warmup_steps": 10, "total_steps": 110, "min_lr_ratio": 0.1}
    lrs = [warmup_cosine(s, **kw) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in itertools.pairwise(lrs[:10]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:110]))
    assert lrs[109] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert warmup_cosine(0, base_lr=2.0, warmup_steps=0, total_steps=5, min_lr_ratio=0.0) == 2.0
