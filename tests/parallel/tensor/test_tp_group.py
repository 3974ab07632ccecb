"""A 2-rank gloo group against the dense model: outputs, gradients, ZeRO-1, stage runner.

One group is launched per module (starting ranks costs seconds) and runs every rank-side
check in ``tp_rank_checks``; each test compares one part with a dense computation here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import tp_rank_checks as rc

from shoal.parallel.tensor import LaunchConfig, launch_tp_group

pytestmark = pytest.mark.slow

CFG = LaunchConfig(
    init_timeout_s=120.0, collective_timeout_s=120.0, run_timeout_s=240.0, threads_per_rank=1
)


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return launch_tp_group(2, rc.all_checks, (), config=CFG)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> float:
    diff = float((a - b).abs().max())
    assert diff <= tol, diff
    return diff


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_outputs_and_gradients_match_dense(ranks: list[dict[str, Any]], dtype: str) -> None:
    tol = 1e-10 if dtype == "float64" else 2e-5
    dense = rc.dense_model(getattr(torch, dtype))
    x, y = rc.batch(0)
    with torch.no_grad():
        logits = dense(x)
    loss = dense(x, y)
    loss.backward()
    for r in ranks:
        out = r[dtype]["model"]
        _close(out["logits"], logits, tol)
        _close(out["loss"], loss.detach(), tol)
        grads = out["grads"]
        assert set(grads) == {n for n, _ in dense.named_parameters()}
        for name, p in dense.named_parameters():
            assert p.grad is not None
            assert grads[name].shape == p.shape
            _close(grads[name], p.grad, tol)
        norm = torch.linalg.vector_norm(
            torch.cat([p.grad.reshape(-1).double() for p in dense.parameters()])
        )
        assert abs(out["norm"] - float(norm)) <= 1e-6 * float(norm)
    torch.nn.utils.clip_grad_norm_(dense.parameters(), float(norm) / 2)
    for r in ranks:
        clipped = r[dtype]["model"]["clipped_grads"]
        for name, p in dense.named_parameters():
            assert p.grad is not None
            _close(clipped[name], p.grad, tol)


def test_f_and_g_communicate_in_the_right_direction(ranks: list[dict[str, Any]]) -> None:
    x = torch.arange(4, dtype=torch.float64)
    for r in ranks:  # weights 1 and 2 on the two ranks
        assert torch.equal(r["fg"]["y"], x * 3)
        assert torch.equal(r["fg"]["dx"], torch.full((4,), 3.0, dtype=torch.float64))


def test_replicated_gradients_are_bit_identical_across_ranks(ranks: list[dict[str, Any]]) -> None:
    for dtype in ("float64", "float32"):
        a, b = (r[dtype]["model"]["replicated_grads"] for r in ranks)
        assert a.numel() > 0
        assert torch.equal(a, b)


def _dense_adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    params = list(model.parameters())
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=(0.9, 0.95),
    )


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_zero1_step_equals_dense_adamw_step(ranks: list[dict[str, Any]], dtype: str) -> None:
    """Same gradients in, same parameters out: the sharded update is the dense arithmetic."""
    dense = rc.dense_model(getattr(torch, dtype))
    grads = rc.injected_grads(getattr(torch, dtype))
    opt = _dense_adamw(dense)
    for _ in range(2):
        for name, p in dense.named_parameters():
            p.grad = grads[name].clone()
        opt.step()
        opt.zero_grad()
    tol = 1e-15 if dtype == "float64" else 1e-7  # ulps: vector tails differ from flat shards
    initial = dict(rc.dense_model(getattr(torch, dtype)).named_parameters())
    for r in ranks:
        after = r[dtype]["model"]["after_injected"]
        for name, p in dense.named_parameters():
            _close(after[name], p.detach(), tol)
            assert not torch.equal(after[name], initial[name].detach())  # really stepped


def test_tp_training_with_zero1_tracks_dense_training(ranks: list[dict[str, Any]]) -> None:
    """End to end in float64: TP forward/backward + ZeRO-1 for two steps equals dense."""
    dense = rc.dense_model(torch.float64)
    opt = _dense_adamw(dense)
    for step in range(2):
        xs, ys = rc.batch(10 + step)
        dense(xs, ys).backward()
        opt.step()
        opt.zero_grad()
    for r in ranks:
        after = r["float64"]["model"]["after_steps"]
        for name, p in dense.named_parameters():
            _close(after[name], p.detach(), 1e-10)
    dense_state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    per_rank = [r["float64"]["model"]["opt_state_bytes"] for r in ranks]
    assert max(per_rank) < 0.55 * dense_state  # sharded: about half of the dense state each


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_stage_runner_answers_like_dense_stages(ranks: list[dict[str, Any]], dtype: str) -> None:
    tol = 1e-10 if dtype == "float64" else 2e-5
    res = ranks[0][dtype]["runner"]
    assert ranks[1][dtype]["runner"]["followed0"] == 3  # forward, backward, stop
    assert ranks[1][dtype]["runner"]["followed1"] == 5  # forward, backward, step, forward, stop
    s0, s1 = rc.dense_stages(getattr(torch, dtype))
    x_ids, y = rc.batch(20)
    h = s0(x_ids)
    _close(res["fwd0"], h.detach(), tol)
    h.backward(res["grad_out0"])
    grad_in, loss = res["bwd0"]
    assert grad_in is None and loss is None  # first stage: byte ids have no gradient
    hin = res["h1"].clone().requires_grad_(True)
    loss1 = s1(hin, y)
    _close(res["fwd1_loss"], loss1.detach(), tol)
    loss1.backward()
    grad_h, loss_b = res["bwd1"]
    _close(grad_h, hin.grad, tol)
    _close(loss_b, loss1.detach(), tol)
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in s1.parameters() if p.dim() >= 2], "weight_decay": 0.0},
            {"params": [p for p in s1.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=(0.9, 0.95),
    )
    opt.step()
    with torch.no_grad():
        after = s1(res["h1"], y)
    _close(res["fwd1_after_step"], after, tol)
    assert float((after - loss1.detach()).abs()) > 0  # the step changed the stage
