import pytest
import torch

from shoal.errors import ConfigError
from shoal.models import GPT, model_config, split_stages, stage_ranges


def _run(stages, idx, targets=None):
    x = idx
    for stage in stages[:-1]:
        x = stage(x)
    return stages[-1](x, targets)


@pytest.mark.parametrize("boundaries", [[], [1], [2], [0, 1, 2], [1, 3]])
def test_stages_in_sequence_are_bit_identical_to_the_model(boundaries):
    model = GPT(model_config("tiny", n_layer=4), seed=3)
    stages = split_stages(model, boundaries)
    assert len(stages) == len(boundaries) + 1
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    tgt = torch.roll(idx, -1, dims=1)
    assert torch.equal(_run(stages, idx), model(idx))
    assert torch.equal(_run(stages, idx, tgt), model(idx, tgt))


def test_shared_tie_gives_the_same_gradients_as_the_model():
    model = GPT(model_config("tiny"), seed=1)
    idx = torch.randint(0, 256, (2, 8))
    model(idx, idx).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    stages = split_stages(model, [1])
    assert stages[-1].head_weight is stages[0].wte.weight
    _run(stages, idx, idx).backward()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, expected[n]), n


def test_copy_tie_holds_its_own_weight_whose_grads_sum_to_the_models():
    model = GPT(model_config("tiny"), seed=1)
    idx = torch.randint(0, 256, (2, 8))
    model(idx, idx).backward()
    expected = model.wte.weight.grad.clone()
    model.zero_grad()
    first, last = split_stages(model, [1], tie="copy")
    assert last.head_weight is not first.wte.weight
    assert torch.equal(last.head_weight, first.wte.weight)
    last(first(idx), idx).backward()
    total = first.tied_weight.grad + last.tied_weight.grad
    torch.testing.assert_close(total, expected)


def test_stage_roles():
    stages = split_stages(GPT(model_config("tiny", n_layer=3)), [1, 2])
    assert [s.is_first for s in stages] == [True, False, False]
    assert [s.is_last for s in stages] == [False, False, True]
    assert [(s.start, s.stop) for s in stages] == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError):
        stages[0](torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("bad", [[3], [1, 1], [2, 1], [-1]])
def test_bad_boundaries_are_refused(bad):
    with pytest.raises(ConfigError, match="boundaries"):
        stage_ranges(2, bad)
