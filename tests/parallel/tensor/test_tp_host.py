"""``TPStageHost``: this process is rank 0 of a 2-rank group and serves the last stage."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import tp_rank_checks as rc

from shoal.parallel.tensor import LaunchConfig, StageSpec, TPStageHost

pytestmark = pytest.mark.slow


def test_host_serves_like_the_dense_stage_and_shuts_down_cleanly() -> None:
    spec = StageSpec(model=rc.CFG, seed=rc.SEED, boundaries=(1,), index=1, lr=1e-2, dtype="float64")
    cfg = LaunchConfig(init_timeout_s=120.0, collective_timeout_s=120.0, threads_per_rank=1)
    dense = spec.dense_stage()
    opt = torch.optim.AdamW(dense.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    _, y = rc.batch(40)
    h = torch.randn(
        2, 16, rc.CFG.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(41)
    )
    host = TPStageHost.start(2, spec, config=cfg)
    try:
        for _ in range(2):
            hin = h.clone().requires_grad_(True)
            loss = dense(hin, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            grad_in, tp_loss = host.runner.backward(h, targets=y)
            host.runner.step()
            assert tp_loss is not None and grad_in is not None
            assert abs(float(tp_loss) - float(loss.detach())) < 1e-10
            assert float((grad_in - hin.grad).abs().max()) < 1e-10
        with torch.no_grad():
            assert abs(float(host.runner.forward(h, y)) - float(dense(h, y))) < 1e-10
    finally:
        followers = host.close(timeout_s=60.0)
    assert followers == [{"rank": 1, "items": 6}]  # 2 x (backward, step), forward, stop
    assert not dist.is_initialized()
    assert host.close() == []  # idempotent
