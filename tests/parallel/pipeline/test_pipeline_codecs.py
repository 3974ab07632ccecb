"""Boundary codecs, the subspace projection's exact gradient, and the server's ledger."""

from __future__ import annotations

import pytest
import torch

from shoal.compress.activations import SubspaceCodec, subspace_basis
from shoal.errors import ProtocolViolation
from shoal.parallel.pipeline.codecs import BoundaryCodec
from shoal.parallel.pipeline.ledger import Ledger


def test_roundtrip_errors_and_sizes() -> None:
    x = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(0))
    exact = BoundaryCodec("none", 64, 0)
    assert torch.equal(exact.roundtrip(x), x)
    q = BoundaryCodec("int8", 64, 0, block_size=64)
    payload = q.encode(x)
    assert payload[0].dtype == torch.int8
    blocks = x.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    assert ((q.roundtrip(x) - x).reshape(-1, 64).abs() <= blocks / 254 + 1e-6).all()
    sub = BoundaryCodec("subspace-int8", 64, 1, rank=8, block_size=64)
    wire = sum(t.numel() * t.element_size() for t in sub.encode(x))
    assert wire < x.numel() * 4 / 25


def test_subspace_is_a_projection_with_the_exact_gradient() -> None:
    codec = SubspaceCodec(32, 4, seed=3)
    u = subspace_basis(32, 4, seed=3)
    assert torch.allclose(u.T @ u, torch.eye(4), atol=1e-5)
    assert torch.equal(u, codec.basis)  # both sides derive the same basis
    x = torch.randn(2, 5, 32, requires_grad=True)
    y = codec.project(x)
    assert torch.allclose(codec.project(y), y, atol=1e-5)  # idempotent
    g = torch.randn(2, 5, 32)
    (grad,) = torch.autograd.grad(y, x, g)
    sent = codec.decode(codec.encode(g))  # what crosses back: coefficients of g
    assert torch.allclose(grad, sent, atol=1e-5)


def test_decode_rejects_malformed_payloads() -> None:
    codec = BoundaryCodec("int8", 64, 0, block_size=64)
    good = codec.encode(torch.randn(2, 4, 64))
    with pytest.raises(ProtocolViolation):
        codec.decode(good[:1])
    with pytest.raises(ProtocolViolation):
        codec.decode((good[0], good[1][:1]))
    with pytest.raises(ProtocolViolation):
        BoundaryCodec("none", 64, 0).decode((torch.zeros(2, 4, 63),))
    with pytest.raises(ProtocolViolation):
        BoundaryCodec("none", 64, 0).decode((torch.zeros(2, 4, 64, dtype=torch.float64),))


def test_ledger_applies_once_and_expires() -> None:
    ledger = Ledger(max_saved=2, ttl_s=10.0, applied_ttl_s=100.0)
    ledger.save(b"a", "ctx-a", now=0.0)
    ledger.save(b"b", "ctx-b", now=1.0)
    ledger.save(b"c", "ctx-c", now=2.0)  # over capacity: "a" dropped
    assert ledger.take(b"a") is None and ledger.counters.expired == 1
    assert ledger.take(b"b") == "ctx-b"
    ledger.mark_applied(b"b", 7, ("answer",), now=3.0)
    assert ledger.applied(b"b") and ledger.answer(b"b") == ("answer",)
    ledger.sweep(now=20.0)  # "c" abandoned
    assert ledger.take(b"c") is None and ledger.counters.expired == 2
    ledger.sweep(now=200.0)
    assert not ledger.applied(b"b")
    assert ledger.counters.applied == 1 and ledger.counters.applied_micro_batches == [7]


def test_simulated_boundary_matches_the_wire() -> None:
    from shoal.parallel.pipeline.simulate import boundary

    codec = BoundaryCodec("subspace-int8", 32, 0, rank=8, block_size=32)
    x = torch.randn(2, 3, 32, requires_grad=True)
    y = boundary(x, codec)
    assert torch.equal(y, codec.decode(codec.encode(x)))
    g = torch.randn(2, 3, 32)
    (grad,) = torch.autograd.grad(y, x, g)
    assert torch.equal(grad, codec.decode(codec.encode(g)))
