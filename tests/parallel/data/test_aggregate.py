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
