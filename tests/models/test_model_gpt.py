import pytest
import torch

from shoal.errors import ConfigError
from shoal.models import GPT, MODEL_SIZES, ModelConfig, model_config


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("tiny", 0.3e6, 0.7e6), ("small", 8e6, 13e6), ("base", 100e6, 140e6), ("1b", 0.9e9, 1.2e9)],
)
def test_named_sizes_have_the_advertised_parameter_counts(name, low, high):
    cfg = model_config(name)
    assert low <= cfg.num_params() <= high
    meta = GPT(cfg, device="meta")  # no memory for the weights
    assert meta.num_params() == cfg.num_params()


def test_small_sizes_count_matches_real_weights():
    for name in ("tiny", "small"):
        assert GPT(MODEL_SIZES[name]).num_params() == MODEL_SIZES[name].num_params()


def test_forward_shapes_and_loss():
    model = GPT(model_config("tiny"))
    idx = torch.randint(0, 256, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, 256)
    loss = model(idx, torch.randint(0, 256, (3, 17)))
    assert loss.shape == ()
    # an untrained model predicts bytes close to uniformly: loss near ln(256)
    assert 4.5 < loss.item() < 6.5


def test_tied_embedding_is_one_parameter():
    model = GPT(model_config("tiny"))
    names = [n for n, _ in model.named_parameters()]
    assert "wte.weight" in names
    assert not any("head" in n for n in names)


def test_named_linears_for_tensor_parallelism():
    names = {n for n, _ in GPT(model_config("tiny")).named_modules()}
    for leaf in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc_in", "mlp.fc_out"):
        assert f"blocks.0.{leaf}" in names


def test_init_is_deterministic_and_ignores_global_rng():
    cfg = model_config("tiny")
    torch.manual_seed(1)
    a = GPT(cfg, seed=7)
    torch.manual_seed(2)
    torch.rand(100)
    b = GPT(cfg, seed=7)
    c = GPT(cfg, seed=8)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.wte.weight, c.wte.weight)


def test_causality_future_bytes_do_not_change_past_logits():
    model = GPT(model_config("tiny")).eval()
    idx = torch.randint(0, 256, (1, 12))
    other = idx.clone()
    other[0, 8:] = (other[0, 8:] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[:, :8], model(other)[:, :8])
        assert not torch.allclose(model(idx)[:, 8:], model(other)[:, 8:])


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown model 'huge'.*tiny, small, base, 1b"):
        model_config("huge")


@pytest.mark.parametrize(
    "kwargs",
    [{"n_head": 3}, {"d_model": 0}, {"dropout": 1.5}, {"n_layer": 2.5}, {"init_std": "0.02"}],
)
def test_invalid_model_config_names_the_field(kwargs):
    field = next(iter(kwargs))
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**kwargs)


def test_sequence_longer_than_rotary_tables_is_refused():
    model = GPT(model_config("tiny", max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_module_apply_still_walks_the_tree_and_rotary_apply_rotates():
    model = GPT(model_config("tiny"))
    visited = []
    model.apply(lambda m: visited.append(type(m).__name__))
    assert "Rotary" in visited and visited[-1] == "GPT"
    x = torch.randn(1, 2, 5, 32)
    assert torch.equal(model.rotary.apply(x), model.rotary.rotate(x))
    # rotation preserves the norm of each channel pair
    torch.testing.assert_close(model.rotary.rotate(x).norm(dim=-1), x.norm(dim=-1))
