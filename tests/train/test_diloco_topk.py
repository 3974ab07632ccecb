"""Top-k averaging of pseudo-gradients: what is sent, error feedback, the commit rule, and the
outer loop driving it."""

from __future__ import annotations

import pytest
import torch

from shoal.compress.sparse import SparseCodec
from shoal.errors import ConfigError
from shoal.train.diloco import DiLoCo, DiLoCoConfig
from shoal.train.diloco_topk import TopKAverager
from shoal.train.outer import OuterConfig
from shoal.train.swarm_round_config import RoundOutcome

N = 1000


def _ok(vector: torch.Tensor, weight: float, index: int, stage: int) -> RoundOutcome:
    return RoundOutcome(True, contributors=frozenset({1, 2}), weight=weight, group_size=2)


def _failed(vector: torch.Tensor, weight: float, index: int, stage: int) -> RoundOutcome:
    vector.fill_(7.0)  # a failing round may leave anything in its buffer
    return RoundOutcome(False, reason="peer died")


def _left_out(vector: torch.Tensor, weight: float, index: int, stage: int) -> RoundOutcome:
    vector.copy_(torch.arange(vector.numel(), dtype=torch.float32))  # the others' mean
    return RoundOutcome(True, contributors=frozenset({2}), weight=1.0, group_size=2, included=False)


def test_a_round_sends_the_k_largest_values_and_keeps_the_rest() -> None:
    delta = torch.randn(N, generator=torch.Generator().manual_seed(0))
    sent: list[torch.Tensor] = []

    def record(vector, weight, index, stage):
        sent.append(vector.clone())
        return _ok(vector, weight, index, stage)

    avg = TopKAverager(0.05)
    out = delta.clone()
    assert avg.average(out, 3.0, 0, record).ok
    (vector,) = sent
    assert int((vector != 0).sum()) == 50
    assert vector.abs().max() == delta.abs().max()
    assert delta.abs()[vector == 0].max() <= delta.abs()[vector != 0].min()
    assert torch.equal(out, vector)  # the (one-member) mean
    assert torch.equal(out + avg.feedback.residual, delta)  # nothing lost
    assert SparseCodec().encode(vector).wire_bytes == 50 * 8  # what the wire carries


def test_error_feedback_sends_everything_eventually() -> None:
    g = torch.Generator().manual_seed(1)
    avg = TopKAverager(0.1)
    total_in = torch.zeros(N, dtype=torch.float64)
    total_out = torch.zeros(N, dtype=torch.float64)
    owed = []
    for _ in range(40):
        delta = torch.randn(N, generator=g)
        total_in += delta.double()
        assert avg.average(delta, 1.0, 0, _ok).ok
        total_out += delta.double()
        residual = avg.feedback.residual.double()
        assert torch.allclose(total_out + residual, total_in, atol=1e-4)
        owed.append(float(residual.norm()))
    # What is owed levels off while the inputs' sum keeps growing (a random walk).
    assert owed[-1] < 1.2 * owed[19] and owed[-1] < 0.5 * float(total_in.norm())


@pytest.mark.parametrize("round_fn", [_failed, _left_out])
def test_a_round_that_did_not_apply_our_values_keeps_the_error_feedback(round_fn) -> None:
    g = torch.Generator().manual_seed(2)
    avg = TopKAverager(0.1)
    assert avg.average(torch.randn(N, generator=g), 1.0, 0, _ok).ok
    residual = avg.feedback.residual.clone()
    delta = torch.randn(N, generator=g)
    out = delta.clone()
    result = avg.average(out, 1.0, 1, round_fn)
    assert torch.equal(avg.feedback.residual, residual)  # nothing was sent: nothing owed less
    if result.ok:  # left out: the others' mean, for the outer step every member takes
        assert torch.equal(out, torch.arange(N, dtype=torch.float32))
    else:  # failed: the pseudo-gradient is as it was
        assert torch.equal(out, delta)


def test_topk_outer_loop_moves_the_model_by_the_sparse_mean() -> None:
    torch.manual_seed(3)
    model = torch.nn.Linear(20, 10)
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    avg = TopKAverager(0.1)
    loop = DiLoCo(
        params,
        DiLoCoConfig(local_steps=2, outer=OuterConfig(lr=1.0, momentum=0.0)),
        lambda vector, weight, index: avg.average(vector, weight, index, _ok),
    )
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))
    assert loop.after_local_step(4) is None
    report = loop.after_local_step(4)
    assert report is not None and report.ok
    moved = torch.cat([(p.detach() - s).reshape(-1) for p, s in zip(params, start, strict=True)])
    assert int((moved != 0).sum()) == round(0.1 * moved.numel())  # only the sent values


def test_bad_fractions_are_refused() -> None:
    for fraction in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="topk fraction"):
            TopKAverager(fraction)


def test_error_feedback_from_a_checkpoint_must_fit() -> None:
    avg = TopKAverager(0.1)
    assert avg.local_state() == {}  # nothing owed before the first round
    assert avg.average(torch.randn(N), 1.0, 0, _ok).ok
    saved = avg.local_state()
    again = TopKAverager(0.1)
    assert again.load_local_state(saved, N)
    assert torch.equal(again.feedback.residual, avg.feedback.residual)
    for wrong in (
        {},
        {k: v[:-1] for k, v in saved.items()},
        {k: v.double() for k, v in saved.items()},
    ):
        assert not again.load_local_state(wrong, N) and again.feedback.residual is None
