"""Shares planned from the members' links, the partition, and zero-copy flattening."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.errors import ConfigError
from shoal.parallel.data.partition import (
    FlatVector,
    modeled_round_time,
    part_ranges,
    plan_shares,
    split_sizes,
)


def _equal(clients: list[bool]) -> list[float]:
    reducers = clients.count(False)
    return [0.0 if c else 1.0 / reducers for c in clients]


def test_equal_links_get_equal_shares_and_clients_nothing():
    assert plan_shares([5e7] * 4) == pytest.approx([0.25] * 4, abs=1e-6)
    shares = plan_shares([1e8, 1e8, 1e8], [1e8, 1e8, 1e8], [False, False, True])
    assert shares[2] == 0.0 and shares[:2] == pytest.approx([0.5, 0.5], abs=1e-6)


def test_a_slow_uplink_reduces_little_but_a_slow_link_both_ways_its_share():
    # Reducing a part costs a member what it sends of it (the result, to n - 1 others)
    # and saves it what it would send to another reducer. With a slow uplink alone, little
    # to reduce is best; when its downlink is as slow, a small share only moves the wait
    # from the reduce-scatter to the all-gather, and the equal split stays best.
    fast = [8e7] * 3
    asym = plan_shares([8e6, *fast], [8e7, *fast])
    assert asym[0] < 0.05
    assert modeled_round_time(asym, [8e6, *fast], [8e7, *fast]) < 0.75 * modeled_round_time(
        [0.25] * 4, [8e6, *fast], [8e7, *fast]
    )
    assert plan_shares([8e6, *fast], [8e6, *fast]) == pytest.approx([0.25] * 4, abs=1e-6)
    # bandwidth-proportional shares would be a third slower there
    proportional = [x / 2.48e8 for x in (8e6, *fast)]
    links = ([8e6, *fast], [8e6, *fast])
    assert modeled_round_time(proportional, *links) > 1.25 * modeled_round_time([0.25] * 4, *links)


def test_among_equally_fast_splits_the_nearest_equal_one_is_taken():
    # The slow uplink sets the round's time whatever the fast two do: any split of the
    # rest between them is as fast, and the work stays spread evenly.
    ups, downs = [1e6, 1e9, 2e9], [1e9, 1e9, 2e9]
    shares = plan_shares(ups, downs)
    assert shares[1] == pytest.approx(shares[2], rel=1e-9)
    lopsided = [shares[0], (1 - shares[0]) * 0.3, (1 - shares[0]) * 0.7]
    assert modeled_round_time(lopsided, ups, downs) == pytest.approx(
        modeled_round_time(shares, ups, downs), rel=1e-9
    )


def test_an_unmeasured_downlink_is_taken_as_the_uplink():
    assert plan_shares([1e7, 1e8], [0.0, 3e8]) == plan_shares([1e7, 1e8], [1e7, 3e8])
    assert plan_shares([1e7, 1e8]) == plan_shares([1e7, 1e8], [1e7, 1e8])


def test_bad_links_are_config_errors():
    with pytest.raises(ConfigError, match="no member can reduce"):
        plan_shares([1.0, 2.0], client_mode=[True, True])
    with pytest.raises(ConfigError, match=r"uplinks_bps\[1\]"):
        plan_shares([1.0, float("nan")])
    with pytest.raises(ConfigError, match=r"uplinks_bps\[0\]"):
        plan_shares([0.0, 1.0])
    with pytest.raises(ConfigError, match=r"downlinks_bps\[1\]"):
        plan_shares([1.0, 1.0], [1.0, -1.0])
    with pytest.raises(ConfigError, match="2 downlinks"):
        plan_shares([1.0, 1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ConfigError, match="need members"):
        plan_shares([])
    with pytest.raises(ConfigError, match="3 shares"):
        modeled_round_time([0.3, 0.3, 0.4], [1.0, 1.0])


_rates = st.floats(1e3, 1e11)


@settings(max_examples=150, deadline=None)
@given(
    links=st.lists(
        st.tuples(_rates, st.one_of(st.just(0.0), _rates), st.booleans()), min_size=2, max_size=24
    ).filter(lambda m: not all(c for _, _, c in m)),
    other=st.lists(st.floats(0, 1), min_size=24, max_size=24),
)
def test_planned_shares_are_never_beaten(links, other):
    ups = [u for u, _, _ in links]
    downs = [d for _, d, _ in links]
    clients = [c for _, _, c in links]
    shares = plan_shares(ups, downs, clients)
    assert sum(shares) == pytest.approx(1.0, abs=1e-9)
    assert all(s >= 0 for s in shares)
    assert all(s == 0 for s, c in zip(shares, clients, strict=True) if c)
    best = modeled_round_time(shares, ups, downs)
    # against equal shares and against any other split among the reducers
    weights = [0.0 if c else w for w, c in zip(other[: len(clients)], clients, strict=True)]
    candidates = [_equal(clients)]
    if sum(weights) > 0:
        candidates.append([w / sum(weights) for w in weights])
    for candidate in candidates:
        assert best <= modeled_round_time(candidate, ups, downs) * (1 + 1e-6)


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


@given(
    total=st.integers(0, 100_000),
    shares=st.lists(st.sampled_from([0.0, 0.1, 0.25, 1.0, 3.0]), min_size=1, max_size=9),
    align=st.sampled_from([1, 7, 256, 4096]),
)
def test_aligned_parts_tile_the_vector_and_start_on_the_grid(total, shares, align):
    if not sum(shares) > 0:
        shares = [*shares[:-1], 1.0]
    ranges = part_ranges(total, shares, align)
    assert len(ranges) == len(shares)
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    for (_, end), (start, _) in itertools.pairwise(ranges):
        assert end == start
    for (start, end), share in zip(ranges, shares, strict=True):
        assert start <= end and (start % align == 0 or start == total)
        if share == 0:  # a client's part stays empty
            assert start == end
