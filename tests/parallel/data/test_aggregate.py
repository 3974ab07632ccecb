"""Screening and combining contributions."""

from __future__ import annotations

import pytest
import torch

from shoal.errors import ConfigError
from shoal.parallel.data.aggregate import AggregationConfig, aggregate, screen, weighted_mean


def test_weighted_mean_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(1000, generator=g) for _ in range(4)]
    weights = [1.0, 2.0, 3.0, 10.0]
    expect = sum(p.double() * w for p, w in zip(parts, weights, strict=True)) / sum(weights)
    assert torch.allclose(weighted_mean(parts, weights).double(), expect, atol=1e-6)


def test_screen_rejects_nan_inf_and_huge_contributions_with_reasons():
    good = {f"p{i}": torch.randn(100) for i in range(4)}
    parts = {
        **good,
        "nan": torch.full((100,), float("nan")),
        "inf": torch.tensor([float("inf")] + [0.0] * 99),
        "huge": torch.randn(100) * 1e5,
        "absurd": torch.randn(100) * 1e7,
    }
    accepted, rejected = screen(parts, AggregationConfig())
    assert accepted == set(good)
    assert rejected["nan"] == "not finite" and rejected["inf"] == "not finite"
    assert "median" in rejected["huge"] and "rms" in rejected["absurd"]


def test_trimmed_mean_ignores_one_outlier_per_coordinate():
    parts = [torch.ones(5) * v for v in (1.0, 2.0, 3.0, 4.0, 1000.0)]
    out = aggregate(parts, [1.0] * 5, AggregationConfig(kind="trimmed_mean", trim_fraction=0.2))
    assert torch.allclose(out, torch.full((5,), 3.0))


def test_centered_clip_bounds_the_pull_of_an_outlier():
    parts = [torch.zeros(4) for _ in range(4)] + [torch.full((4,), 1e6)]
    config = AggregationConfig(kind="centered_clip", clip_radius=1.0, clip_iterations=5)
    out = aggregate(parts, [1.0] * 5, config)
    # The outlier moves the center by at most radius * its weight share per iteration.
    assert float(out.norm()) <= 5 * 1.0 / 5 + 1e-6
    plain = aggregate(parts, [1.0] * 5, AggregationConfig())
    assert float(plain.norm()) > 1e5


def test_config_checks_name_field_and_value():
    with pytest.raises(ConfigError, match=r"kind.*'median'"):
        AggregationConfig(kind="median")
    with pytest.raises(ConfigError, match="trim_fraction"):
        AggregationConfig(trim_fraction=0.5)


@pytest.mark.parametrize(
    ("values", "expect"),
    [
        ((1.0, 2.0, 1000.0), 2.0),  # three peers: the median
        ((1.0, 2.0, 3.0, 1000.0), 2.5),  # four: the middle two
        ((1.0, 3.0), 2.0),  # two cannot be told apart: their mean
    ],
)
def test_trimmed_mean_trims_small_groups_too(values, expect):
    # int(n * 0.2) is 0 below five peers; one liar used to decide the mean of 3 or 4.
    parts = [torch.full((3,), v) for v in values]
    out = aggregate(parts, [1.0] * len(parts), AggregationConfig(kind="trimmed_mean"))
    assert torch.equal(out, torch.full((3,), expect))


def test_centered_clip_of_an_even_count_starts_at_the_middle_not_the_lower_value():
    # torch.median's lower middle value started a pair at its minimum, where a liar
    # sending -1e6 everywhere kept the result.
    honest, liar = torch.full((4,), 1.0), torch.full((4,), -1e6)
    config = AggregationConfig(kind="centered_clip", clip_radius=1.0, clip_iterations=3)
    out = aggregate([honest, liar], [1.0, 1.0], config)
    assert torch.allclose(out, (honest + liar) / 2)  # a pair gets its mean
    parts = [torch.zeros(4), torch.zeros(4), torch.full((4,), 2.0), torch.full((4,), 1e6)]
    out = aggregate(parts, [1.0] * 4, config)
    # starts at 1.0 (the mean of 0 and 2); each iteration moves it by at most the radius
    assert float((out - 1.0).norm()) <= 3 * 1.0 + 1e-6


def test_screen_keeps_honest_peers_when_most_send_zeros():
    # Untouched rows: the median norm is 0, and every peer that sent anything was rejected.
    parts = {"a": torch.zeros(8), "b": torch.zeros(8), "c": torch.full((8,), 0.1)}
    accepted, rejected = screen(parts, AggregationConfig())
    assert accepted == {"a", "b", "c"} and rejected == {}


def test_a_tiny_norm_among_zeros_does_not_set_the_limit_for_everyone():
    # The median of {0, 0, 1e-6 x, 0.1 x} was 1e-6 x: the honest 0.1 fell past 1000 x it.
    zeros = {"a": torch.zeros(8), "b": torch.zeros(8)}
    for tiny in (1e-6, 1e-4):
        parts = {**zeros, "liar": torch.full((8,), tiny), "c": torch.full((8,), 0.1)}
        accepted, rejected = screen(parts, AggregationConfig())
        assert accepted == set(parts) and rejected == {}
    # With three non-zero norms the ratio applies again.
    parts = {**zeros, "c": torch.ones(8), "d": torch.ones(8), "e": torch.ones(8) * 1e4}
    assert "median" in screen(parts, AggregationConfig())[1]["e"]


def test_norms_that_fp32_underflows_or_overflows_are_measured_in_fp64():
    # Tiny honest parts had an fp32 norm of 0, which switched the ratio check off, so a
    # part 1e28 times larger was accepted; parts near 1e20 were called "not finite".
    parts = {f"p{i}": torch.full((8,), 1e-23) for i in range(3)} | {"big": torch.full((8,), 1e5)}
    accepted, rejected = screen(parts, AggregationConfig())
    assert "median" in rejected["big"] and accepted == {"p0", "p1", "p2"}
    large = screen({"x": torch.full((8,), 1e20)}, AggregationConfig(max_rms=1e30))
    assert large == ({"x"}, {})


def test_centered_clip_caps_a_claimed_weight_at_the_median():
    # A weight is what its sender says: 2**53 samples pulled by the whole radius per step.
    parts = [torch.zeros(4) for _ in range(4)] + [torch.full((4,), 1e6)]
    config = AggregationConfig(kind="centered_clip", clip_radius=1.0, clip_iterations=5)
    out = aggregate(parts, [1.0] * 4 + [2.0**53], config)
    assert float(out.norm()) <= 5 * 1.0 / 5 + 1e-6


def test_clip_iterations_must_be_a_whole_number():
    with pytest.raises(ConfigError, match="clip_iterations must be an int"):
        AggregationConfig(clip_iterations=2.5)
