"""Error bounds and compression ratios of every codec."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.compress import (
    Encoded,
    ErrorFeedback,
    Fp16Codec,
    Int4BlockwiseCodec,
    Int8BlockwiseCodec,
    PowerSGDCodec,
    PowerSGDState,
    SparseCodec,
    TopKCodec,
    compression_ratio,
)
from shoal.compress.registry import codec_by_name, decode
from shoal.compress.sparse import check_sparse
from shoal.errors import ConfigError


def _tensor(seed: int, n: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * scale


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 5000),
    block=st.sampled_from([1, 7, 64, 256, 4096]),
    scale=st.floats(1e-6, 1e6),
)
def test_int8_error_is_at_most_half_a_step_per_block(seed, n, block, scale):
    _assert_half_step(Int8BlockwiseCodec(block), _tensor(seed, n, scale), block, levels=127)


def _assert_half_step(codec, x, block: int, *, levels: int):
    """Every element within half a quantisation step (absmax / (2 * levels)) of its block."""
    enc = codec.encode(x)
    y = codec.decode(enc)
    assert y.shape == x.shape
    err = (x - y).abs()
    n = x.numel()
    absmax = torch.nn.functional.pad(x.abs(), (0, -n % block)).view(-1, block).amax(dim=1)
    bound = (absmax / (2.0 * levels)).repeat_interleave(block)[:n]
    assert torch.all(err <= bound * (1 + 1e-5) + 1e-30)
    return enc


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 5000),
    block=st.sampled_from([2, 8, 64, 256, 4096]),
    scale=st.floats(1e-6, 1e6),
)
def test_int4_error_is_at_most_half_a_step_per_block(seed, n, block, scale):
    enc = _assert_half_step(Int4BlockwiseCodec(block), _tensor(seed, n, scale), block, levels=7)
    assert enc.wire_bytes == -(-n // 2) + 4 * -(-n // block)


@pytest.mark.parametrize("n", [1, 63, 64, 65, 999, 1000, 1001])
@pytest.mark.parametrize("block", [8, 16])
def test_int4_in_pieces_equals_int4_in_one_go(monkeypatch, n, block):
    # Large tensors are encoded ~1 Mi values at a time; the pieces must join seamlessly.
    from shoal.compress import int4

    x = _tensor(n, n, 3.0)
    codec = Int4BlockwiseCodec(block)
    whole = codec.encode(x)
    monkeypatch.setattr(int4, "_CHUNK_ELEMENTS", 32)
    pieces = codec.encode(x)
    assert all(torch.equal(a, b) for a, b in zip(whole.payload, pieces.payload, strict=True))
    assert torch.equal(codec.decode(pieces), codec.decode(whole))


def test_int4_uses_all_fifteen_levels_and_round_trips_them_exactly():
    # Multiples of the step decode exactly: every level survives the nibble packing.
    x = torch.arange(-7, 8, dtype=torch.float32) * 0.5  # odd count: the tail is padded
    codec = Int4BlockwiseCodec(16)
    enc = codec.encode(x)
    assert enc.payload[0].dtype == torch.uint8 and enc.payload[0].numel() == 8
    assert torch.equal(codec.decode(enc), x)


@pytest.mark.parametrize("byte", [0x80, 0x08, 0x00])
def test_int4_refuses_nibble_zero(byte):
    codec = Int4BlockwiseCodec(4)
    enc = codec.encode(torch.randn(8))
    packed, scales = enc.payload
    bad = packed.clone()
    bad[2] = byte
    with pytest.raises(ValueError, match="nibble 0"):
        codec.decode(Encoded(enc.codec, enc.shape, (bad, scales), enc.meta))


def test_int4_blocks_with_nan_or_inf_decode_to_nan_not_to_a_refusal():
    # NaN cast to uint8 wrote nibble 0, which decode refuses: the sender was then reported
    # missing instead of screened out as not finite.
    codec = Int4BlockwiseCodec(4)
    x = torch.tensor([1.0, float("inf"), 2.0, 3.0, 1.0, float("nan"), 0.5, 0.25, 1.0, 2.0])
    y = codec.decode(codec.encode(x))
    assert y[:8].isnan().all() and torch.isfinite(y[8:]).all()


def test_int4_zero_blocks_decode_exactly_and_ratio_matches_formula():
    x = torch.zeros(10_000)
    x[5000:] = torch.linspace(-3, 3, 5000)
    codec = Int4BlockwiseCodec(1000)
    enc = codec.encode(x)
    assert torch.equal(codec.decode(enc)[:5000], torch.zeros(5000))
    assert compression_ratio(enc) == pytest.approx(0.125 + 1 / 1000)
    assert codec.decode(codec.encode(torch.randn(33, 17))).shape == (33, 17)


def test_int8_zero_blocks_decode_exactly_and_ratio_matches_formula():
    x = torch.zeros(10_000)
    x[5000:] = torch.linspace(-3, 3, 5000)
    codec = Int8BlockwiseCodec(1000)
    enc = codec.encode(x)
    assert torch.equal(codec.decode(enc)[:5000], torch.zeros(5000))
    assert enc.wire_bytes == 10_000 + 4 * 10
    assert compression_ratio(enc) == pytest.approx(0.25 + 1 / 1000)


def test_int8_keeps_shape_of_matrices():
    x = torch.randn(33, 17)
    codec = Int8BlockwiseCodec(64)
    assert codec.decode(codec.encode(x)).shape == (33, 17)


def test_int8_encode_of_25m_floats_costs_little_cpu_relative_to_a_copy():
    # The property is cost, so measure CPU time of this thread, not wall time: on a loaded
    # machine wall time mostly measures how long the scheduler kept us off a core. With one
    # intra-op thread torch runs every kernel on the calling thread, so thread_time sees all
    # of it (averaging peers run single-threaded too). The baseline is a plain fp32 copy of
    # the same tensor measured in the same run; best of three absorbs cache disturbances.
    x = torch.randn(25_000_000)
    codec = Int8BlockwiseCodec(4096)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        codec.encode(x)
        best_encode = min(_cpu_s(lambda: codec.encode(x)) for _ in range(3))
        best_copy = min(_cpu_s(lambda: x.clone()) for _ in range(3))
    finally:
        torch.set_num_threads(threads)
    assert best_copy > 0, best_copy
    assert best_encode < 4 * best_copy, (best_encode, best_copy)


def _cpu_s(fn) -> float:
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3000), scale=st.floats(1e-3, 1e4))
def test_fp16_relative_error_is_below_half_precision_epsilon(seed, n, scale):
    x = _tensor(seed, n, scale)
    codec = Fp16Codec()
    enc = codec.encode(x)
    y = codec.decode(enc)
    normal = x.abs() >= 2.0**-14  # fp16 normal range: relative error bound holds
    rel = ((x - y).abs() / x.abs().clamp_min(1e-30))[normal]
    assert torch.all(rel <= 2.0**-11)
    assert compression_ratio(enc) == 0.5


def test_fp16_saturates_instead_of_overflowing_to_inf():
    codec = Fp16Codec()
    y = codec.decode(codec.encode(torch.tensor([1e9, -1e9, 1.0])))
    assert torch.isfinite(y).all()
    assert y[0] == 65504.0 and y[1] == -65504.0
    # ...but non-finite values stay non-finite, so the averager still screens them out
    # (clamp made an inf a finite 65504 that passed screening).
    y = codec.decode(codec.encode(torch.tensor([float("inf"), -float("inf"), 1e9, float("nan")])))
    assert y[0] == float("inf") and y[1] == -float("inf") and y[2] == 65504.0 and y[3].isnan()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 2000), frac=st.floats(0.001, 1.0))
def test_topk_keeps_exactly_k_largest(seed, n, frac):
    x = _tensor(seed, n, 1.0)
    codec = TopKCodec(fraction=frac)
    enc = codec.encode(x)
    k = codec.k_for(n)
    indices, values = enc.payload
    assert indices.numel() == k == values.numel()
    assert len(set(indices.tolist())) == k
    y = codec.decode(enc)
    assert int((y != 0).sum()) <= k
    kept = x.abs()[indices.long()]
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[indices.long()] = False
    if dropped.any():
        assert kept.min() >= x.abs()[dropped].max()
    assert compression_ratio(enc) == pytest.approx(2 * k / n)


def test_topk_error_feedback_loses_nothing_and_running_sums_converge():
    g = torch.Generator().manual_seed(3)
    n, steps = 1000, 400
    codec = TopKCodec(k=50)
    state = ErrorFeedback()
    sum_in = torch.zeros(n, dtype=torch.float64)
    sum_out = torch.zeros(n, dtype=torch.float64)
    mean_gaps = []
    for step in range(1, steps + 1):
        x = torch.randn(n, generator=g) + 0.5
        sum_in += x.double()
        sum_out += codec.decode(codec.encode(x, state)).double()
        # Conservation: nothing is lost, only delayed in the residual.
        assert torch.allclose(sum_out + state.residual.double(), sum_in, atol=1e-3)
        mean_gaps.append(float((sum_in - sum_out).abs().max() / step))
    # The residual stays bounded, so the time-averaged gap shrinks like 1/steps.
    assert mean_gaps[-1] < 0.25 * mean_gaps[49]
    assert mean_gaps[-1] < 0.05
    # Without error feedback the same codec drifts: the gap grows with the step count.
    plain = TopKCodec(k=50)
    drift = torch.zeros(n, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randn(n, generator=g) + 0.5
        drift += x.double() - plain.decode(plain.encode(x)).double()
    assert drift.abs().max() / steps > 10 * mean_gaps[-1]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(2, 60),
    m=st.integers(2, 60),
    true_rank=st.integers(1, 4),
    rank=st.integers(1, 6),
)
def test_powersgd_is_exact_for_matrices_of_rank_at_most_r(seed, n, m, true_rank, rank):
    if true_rank > rank:
        true_rank = rank
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, true_rank, generator=g) @ torch.randn(true_rank, m, generator=g)
    codec = PowerSGDCodec(rank)
    state = PowerSGDState(seed=seed)
    enc = codec.encode(x, state)
    y = codec.decode(enc)
    assert torch.allclose(y, x, atol=1e-4 * (1 + x.abs().max().item()))
    assert compression_ratio(enc) <= 1.0
    if enc.meta["dense"]:  # factors would not have been smaller: nothing left behind
        assert state.residual is None
    else:
        assert state.residual is not None
        assert state.residual.abs().max() <= 1e-4 * (1 + x.abs().max().item())


def test_powersgd_ratio_warm_start_and_error_feedback():
    g = torch.Generator().manual_seed(0)
    n, m, r = 256, 128, 4
    codec = PowerSGDCodec(r)
    enc = codec.encode(torch.randn(n, m, generator=g))
    assert compression_ratio(enc) == pytest.approx(r * (n + m) / (n * m))
    # Error feedback: sum of decoded outputs + residual equals sum of inputs.
    state = PowerSGDState()
    target = torch.randn(n, 8, generator=g) @ torch.randn(8, m, generator=g)
    sum_in = torch.zeros(n, m)
    sum_out = torch.zeros(n, m)
    errors = []
    for step in range(1, 31):
        sum_in += target
        out = codec.decode(codec.encode(target, state))
        sum_out += out
        assert torch.allclose(sum_out + state.residual, sum_in, atol=1e-2)
        errors.append(float((sum_in - sum_out).norm() / (step * target.norm())))
    assert errors[-1] < 0.3 * errors[0]
    # The basis is warm-started from the previous call.
    assert state.q is not None and state.q.shape == (m, r)


def test_powersgd_sends_vectors_dense():
    codec = PowerSGDCodec(2)
    x = torch.randn(17)
    enc = codec.encode(x)
    assert torch.equal(codec.decode(enc), x)
    # A residual left by earlier sends goes out with it and is cleared, as for a dense
    # matrix (it was kept and never sent).
    state = PowerSGDState(residual=torch.full((17,), 0.25))
    assert torch.equal(codec.decode(codec.encode(x, state)), x + 0.25)
    assert state.residual is None


def test_int8_keeps_values_near_the_largest_float_finite():
    # absmax / 127 rounds up there, and 127 times that overflowed: FLT_MAX decoded as inf,
    # and an honest part was screened out as not finite.
    big = torch.finfo(torch.float32).max
    x = torch.tensor([big, 1.0, -big, 0.0])
    out = Int8BlockwiseCodec(4).decode(Int8BlockwiseCodec(4).encode(x))
    assert torch.isfinite(out).all()
    assert (out - x).abs().max() <= big / 254
    codec = Int8BlockwiseCodec(4)
    inf = codec.decode(codec.encode(torch.tensor([float("inf"), 1.0, 0.0, 0.0])))
    assert not torch.isfinite(inf).all()  # a part that is not finite stays so: screened


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (4, 4), (2, 200)])
def test_powersgd_sends_matrices_dense_when_factors_would_not_be_smaller(shape):
    # rank 2: 2 (4 + 4) = 4 x 4 and 2 (2 + 200) > 2 x 200; empty matrices cannot be factored.
    codec = PowerSGDCodec(2)
    state = PowerSGDState(residual=torch.full(shape, 0.25))
    x = torch.randn(shape)
    enc = codec.encode(x, state)
    assert enc.meta["dense"] == 1 and compression_ratio(enc) <= 1.0
    assert torch.equal(codec.decode(enc), x + 0.25)  # the residual goes out with it
    assert state.residual is None


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3000), density=st.floats(0.0, 1.0))
def test_sparse_is_exact_and_never_costs_more_than_fp32(seed, n, density):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < density)
    enc = SparseCodec().encode(x.view(1, n))
    nnz = int((x != 0).sum())
    assert torch.equal(SparseCodec().decode(enc), x.view(1, n))
    if 2 * nnz >= n:  # dense layout: all values, no positions
        assert len(enc.payload) == 1 and compression_ratio(enc) == 1.0
    else:  # 8 bytes per non-zero: an int32 position and an fp32 value
        indices, values = enc.payload
        assert indices.dtype == torch.int32 and values.numel() == nnz
        assert compression_ratio(enc) == pytest.approx(2 * nnz / n)
        assert compression_ratio(enc) < 1.0


def test_sparse_carries_nan_and_inf_as_they_are():
    x = torch.zeros(100)
    x[[3, 50, 99]] = torch.tensor([float("nan"), float("inf"), -2.0])
    y = SparseCodec().decode(SparseCodec().encode(x))
    assert y[3].isnan() and y[50] == float("inf") and y[99] == -2.0
    assert int((y == 0).sum()) == 97


@pytest.mark.parametrize(
    "indices,values,why",
    [
        ([1, 1], [1.0, 2.0], "strictly increasing"),
        ([2, 1], [1.0, 2.0], "strictly increasing"),
        ([-1], [1.0], "outside"),
        ([10], [1.0], "outside"),
        ([1, 2], [1.0], "positions for"),
        ([0, 1, 2, 3, 4], [1.0] * 5, "5 positions for a tensor of 10"),  # half: dense layout
    ],
)
def test_sparse_decode_refuses_payloads_it_cannot_place(indices, values, why):
    payload = (torch.tensor(indices, dtype=torch.int32), torch.tensor(values))
    with pytest.raises(ValueError, match=why):
        SparseCodec().decode(Encoded("sparse", (10,), payload))


def test_sparse_payload_checks_layouts_and_types():
    with pytest.raises(ValueError, match="int32"):
        check_sparse(10, (torch.tensor([1], dtype=torch.int64), torch.tensor([1.0])))
    with pytest.raises(ValueError, match="dense layout must be 10 float32"):
        check_sparse(10, (torch.zeros(9),))
    with pytest.raises(ValueError, match="1 or 2 tensors"):
        check_sparse(10, ())
    # a huge claimed size with a tiny payload is refused before anything is allocated
    with pytest.raises(ValueError, match="dense layout"):
        SparseCodec().decode(Encoded("sparse", (2**40,), (torch.zeros(3),)))


def test_topk_then_sparse_sends_eight_bytes_per_kept_value():
    x = torch.randn(10_000)
    kept = TopKCodec(fraction=0.01).decode(TopKCodec(fraction=0.01).encode(x))
    enc = SparseCodec().encode(kept)
    assert enc.wire_bytes == 100 * 8 and torch.equal(SparseCodec().decode(enc), kept)


def test_registry_and_config_errors():
    assert codec_by_name("none") is None
    x = torch.randn(100)
    for name, atol in (("fp16", 0.01), ("int8", 0.05), ("int4", 0.5)):
        codec = codec_by_name(name)
        assert torch.allclose(decode(codec.encode(x)), x, atol=atol)
    x[::3] = 0.0
    assert torch.equal(decode(codec_by_name("sparse").encode(x)), x)
    with pytest.raises(ConfigError, match="zstd"):
        codec_by_name("zstd")
    with pytest.raises(ConfigError, match="block_size"):
        Int8BlockwiseCodec(0)
    with pytest.raises(ConfigError, match="even"):
        Int4BlockwiseCodec(7)
    with pytest.raises(ConfigError, match="fraction"):
        TopKCodec(fraction=1.5)
    with pytest.raises(ConfigError, match="rank"):
        PowerSGDCodec(0)


@pytest.mark.parametrize("codec", [Int8BlockwiseCodec(4), Int4BlockwiseCodec(4)])
def test_blocks_of_tiny_values_keep_their_bound_and_their_zeros(codec):
    """The inverse of a tiny absmax overflows to inf (then 0 * inf = NaN); dividing by the
    absmax keeps the half-step bound down to the smallest normal floats."""
    levels = 127 if codec.name == "int8" else 7
    for absmax in (3e-37, 1e-38, 2e-38):
        x = torch.tensor([absmax, absmax / 5, 0.0, -absmax / 3])
        y = codec.decode(codec.encode(x))
        assert torch.isfinite(y).all() and y[2] == 0
        assert (x - y).abs().max() <= absmax / (2 * levels) * (1 + 1e-5)
