"""Bandwidth-proportional partition and zero-copy flattening."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from shoal.errors import ConfigError
from shoal.parallel.data.partition import (
    FlatVector,
    part_ranges,
    shares_from_bandwidth,
    split_sizes,
)


def test_shares_follow_bandwidth_and_clients_get_nothing():
    shares = shares_from_bandwidth([100.0, 300.0, 1000.0], [False, False, True])
    assert shares == pytest.approx([0.25, 0.75, 0.0])


def test_no_reducer_is_a_config_error():
    with pytest.raises(ConfigError, match="no member can reduce"):
        shares_from_bandwidth([1.0, 2.0], [True, True])
    with pytest.raises(ConfigError, match=r"bandwidths_bps\[1\]"):
        shares_from_bandwidth([1.0, float("nan")])


@given(
    total=st.integers(0, 10**8),
    shares=st.lists(st.floats(0, 1e9), min_size=1, max_size=20).filter(lambda s: sum(s) > 0),
)
def test_split_sizes_cover_exactly_and_are_proportional(total, shares):
    sizes = split_sizes(total, shares)
    assert sum(sizes) == total
    weight = sum(shares)
    for size, share in zip(sizes, shares, strict=True):
        assert abs(size - total * share / weight) < 1.0 + 1e-6
        if share == 0:
            assert size == 0
    ranges = part_ranges(total, shares)
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


def test_flat_view_of_adjacent_tensors_does_not_copy():
    buffer = torch.arange(10, dtype=torch.float32)
    tensors = [buffer[0:3].view(3), buffer[3:9].view(2, 3), buffer[9:10]]
    flat = FlatVector(tensors)
    assert flat.is_view and flat.flat.data_ptr() == buffer.data_ptr()
    flat.write_back(torch.full((10,), 7.0))
    assert torch.equal(buffer, torch.full((10,), 7.0))


def test_flat_copy_of_scattered_tensors_writes_back():
    a, b = torch.zeros(2, 2), torch.zeros(3)
    flat = FlatVector([a, b])
    assert not flat.is_view and flat.numel == 7
    flat.write_back(torch.arange(7, dtype=torch.float32))
    assert a.flatten().tolist() == [0, 1, 2, 3] and b.tolist() == [4, 5, 6]
    with pytest.raises(ConfigError, match="float32"):
        FlatVector([torch.zeros(2, dtype=torch.float16)])


def test_write_parts_fills_a_view_in_place_and_a_copy_through_write_back():
    buffer = torch.zeros(6)
    view = FlatVector([buffer[:2], buffer[2:]])
    view.write_parts([(0, 4), (4, 6)], {0: torch.ones(4), 1: torch.full((2,), 2.0)})
    assert buffer.tolist() == [1, 1, 1, 1, 2, 2]
    a, b = torch.zeros(3), torch.zeros(3)
    copied = FlatVector([a, b])
    copied.write_parts([(0, 2), (2, 6)], {0: torch.ones(2), 1: torch.full((4,), 3.0)})
    assert a.tolist() == [1, 1, 3] and b.tolist() == [3, 3, 3]
