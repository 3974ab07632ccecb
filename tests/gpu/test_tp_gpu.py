"""Tensor parallelism on GPUs: NCCL, bf16 autocast, against the dense model on one GPU.

Skipped without CUDA; the 2-rank test needs two GPUs (NCCL gives each rank its own device).
"""

from __future__ import annotations

import pytest
import torch
import tp_gpu_ranks as gr

from shoal.models import GPT
from shoal.parallel.tensor import LaunchConfig, launch_tp_group

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CFG = LaunchConfig(backend="auto", init_timeout_s=120.0, run_timeout_s=300.0)


def _dense(autocast: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model = GPT(gr.CFG, seed=1).cuda()
    x, y = (t.cuda() for t in gr.batch())
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = model(x, y)
    loss.backward()
    return float(loss), {n: p.grad.float().cpu() for n, p in model.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("autocast", [False, True])
def test_tp_on_nccl_matches_dense(world_size: int, autocast: bool) -> None:
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs")
    ranks = launch_tp_group(world_size, gr.gpu_checks, (autocast,), config=CFG)
    loss, grads = _dense(autocast)
    loss_tol, grad_tol = (2e-2, 5e-2) if autocast else (1e-5, 1e-4)  # bf16: ~3 digits
    for r in ranks:
        assert r["backend"] == "nccl" and r["device"].startswith("cuda")
        assert r["grad_dtypes"] == ["torch.float32"]  # master weights and grads stay fp32
        assert abs(r["loss"] - loss) <= loss_tol * abs(loss)
        for name, g in grads.items():
            assert _rel(r["grads"][name], g) <= grad_tol, name
