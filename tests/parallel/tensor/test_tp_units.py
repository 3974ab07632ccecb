"""Pure parts of parallel/tensor: work item headers, configs, shard bookkeeping."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.errors import ConfigError, ProtocolViolation
from shoal.models import model_config
from shoal.parallel.tensor import LaunchConfig, StageSpec
from shoal.parallel.tensor.workitem import HEADER_LEN, Kind, decode_header, encode_header


@pytest.mark.parametrize("kind", list(Kind))
def test_header_round_trip(kind: Kind) -> None:
    tensors = [torch.zeros(2, 3, 4, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.int64)]
    got_kind, specs = decode_header(encode_header(kind, tensors), max_elements=100)
    assert got_kind is kind
    assert [(s.dtype, s.shape) for s in specs] == [(t.dtype, tuple(t.shape)) for t in tensors]


def test_header_rejects_oversized_and_malformed() -> None:
    big = encode_header(Kind.FORWARD, [torch.zeros(10, 11)])
    with pytest.raises(ProtocolViolation, match="110 elements"):
        decode_header(big, max_elements=100)
    bad = encode_header(Kind.FORWARD, []).clone()
    bad[1] = 99
    with pytest.raises(ProtocolViolation, match="kind"):
        decode_header(bad, max_elements=100)
    bad = encode_header(Kind.FORWARD, [torch.zeros(2)]).clone()
    bad[5] = -2
    with pytest.raises(ProtocolViolation, match="negative"):
        decode_header(bad, max_elements=100)
    with pytest.raises(ProtocolViolation):
        decode_header(torch.zeros(HEADER_LEN - 1, dtype=torch.int64), max_elements=100)
    with pytest.raises(ValueError):
        encode_header(Kind.FORWARD, [torch.zeros(1, 1, 1, 1, 1)])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-(2**40), 2**40), min_size=HEADER_LEN, max_size=HEADER_LEN))
def test_any_header_decodes_or_is_rejected(values: list[int]) -> None:
    header = torch.tensor(values, dtype=torch.int64)
    try:
        _, specs = decode_header(header, max_elements=1000)
    except ProtocolViolation:
        return
    for s in specs:
        assert len(s.shape) <= 4 and all(d >= 0 for d in s.shape)
        assert torch.Size(s.shape).numel() <= 1000


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("backend", "mpi"),
        ("init_timeout_s", 0),
        ("run_timeout_s", -1.0),
        ("threads_per_rank", -1),
        ("max_result_bytes", 0),
    ],
)
def test_launch_config_rejects(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        LaunchConfig(**{field: value})  # type: ignore[arg-type]


def test_stage_spec_checks_and_builds_dense_stages() -> None:
    cfg = model_config("tiny", n_layer=2, d_model=32, n_head=2, max_seq_len=16)
    with pytest.raises(ConfigError, match="index"):
        StageSpec(model=cfg, boundaries=(1,), index=2)
    with pytest.raises(ConfigError, match="dtype"):
        StageSpec(model=cfg, dtype="float16")
    whole = StageSpec(model=cfg, dtype="float64").dense_stage()
    assert whole.is_first and whole.is_last
    assert whole.head_weight is whole.wte.weight  # one stage keeps the head tied
    last = StageSpec(model=cfg, boundaries=(1,), index=1).dense_stage()
    assert last.is_last and not last.is_first
