"""Combining the contributions to one part: screening, weighted mean, robust means.

``screen`` rejects contributions that are not finite, whose root-mean-square value exceeds
``max_rms``, or whose norm is more than ``max_norm_ratio`` times the median of the non-zero
norms (when at least three are non-zero: parts where most peers send zeros, such as
untouched embedding rows, would otherwise reject every peer that sent anything, and one
tiny non-zero norm among zeros would set the limit for all).
Rejected peers are excluded from the round and reported with a reason. ``aggregate`` then
combines the accepted ones:

- ``mean``: weighted mean ``sum(w_i x_i) / sum(w_i)`` (weights = samples contributed);
- ``trimmed_mean``: coordinate-wise mean after dropping the ``k`` largest and smallest
  values of each coordinate (unweighted), ``k = ceil(n * trim_fraction)`` but at most
  ``(n - 1) // 2``: three peers give the median, two cannot be trimmed;
- ``centered_clip``: start at the coordinate-wise median (the mean of the two middle values
  for an even count) and move towards each contribution by at most ``clip_radius`` (in L2),
  weighted, for ``clip_iterations`` steps. Weights are capped at the median weight: a
  weight is only what its sender says, and one claiming 2**53 samples would otherwise
  pull by the whole radius while everyone else pulls by almost nothing.

``mean`` trusts weights and every value screening lets through: one peer can move it by
any amount within ``max_rms`` and ``max_norm_ratio``. Choose a robust kind against peers
that may lie.

No robust rule can tell which of two peers is wrong: a pair gets their mean.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch

from shoal.errors import ConfigError

__all__ = [
    "AGGREGATION_KINDS",
    "AggregationConfig",
    "aggregate",
    "check_kind",
    "screen",
    "weighted_mean",
]

AGGREGATION_KINDS = ("mean", "trimmed_mean", "centered_clip")


def check_kind(kind: str, name: str = "kind") -> None:
    """Raise ``ConfigError`` unless ``kind`` is one of ``AGGREGATION_KINDS`` (``name``: the
    setting as its user knows it)."""
    if kind not in AGGREGATION_KINDS:
        raise ConfigError(f"{name} must be one of {', '.join(AGGREGATION_KINDS)}, got {kind!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class AggregationConfig:
    """How a reducer screens and combines contributions."""

    kind: str = "mean"
    """One of ``mean``, ``trimmed_mean``, ``centered_clip``."""
    max_rms: float = 1e6
    """Reject a contribution whose root-mean-square element exceeds this."""
    max_norm_ratio: float = 1e3
    """Reject a contribution whose norm exceeds this many times the median (>= 3 peers)."""
    trim_fraction: float = 0.2
    """``trimmed_mean``: fraction of contributions dropped at each end, per coordinate."""
    clip_radius: float = 1.0
    """``centered_clip``: L2 radius of each contribution's pull."""
    clip_iterations: int = 3
    """``centered_clip``: fixed-point iterations."""

    def __post_init__(self) -> None:
        check_kind(self.kind)
        if not self.max_rms > 0:
            raise ConfigError(f"max_rms must be > 0, got {self.max_rms!r}")
        if not self.max_norm_ratio > 1:
            raise ConfigError(f"max_norm_ratio must be > 1, got {self.max_norm_ratio!r}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction!r}")
        if not self.clip_radius > 0:
            raise ConfigError(f"clip_radius must be > 0, got {self.clip_radius!r}")
        if type(self.clip_iterations) is not int:
            raise ConfigError(f"clip_iterations must be an int, got {self.clip_iterations!r}")
        if self.clip_iterations < 1:
            raise ConfigError(f"clip_iterations must be >= 1, got {self.clip_iterations!r}")


def screen(
    parts: Mapping[Hashable, torch.Tensor], config: AggregationConfig
) -> tuple[set[Hashable], dict[Hashable, str]]:
    """Split contributions into accepted peers and rejected peers (with reasons)."""
    rejected: dict[Hashable, str] = {}
    norms: dict[Hashable, float] = {}
    for peer, part in parts.items():
        norm = _norm(part)
        if not math.isfinite(norm):
            rejected[peer] = "not finite"
            continue
        rms = norm / math.sqrt(max(1, part.numel()))
        if rms > config.max_rms:
            rejected[peer] = f"rms {rms:.3g} > {config.max_rms:.3g}"
            continue
        norms[peer] = norm
    nonzero = sorted(n for n in norms.values() if n > 0)
    if len(nonzero) >= 3:
        limit = config.max_norm_ratio * nonzero[len(nonzero) // 2]
        for peer, norm in norms.items():
            if norm > limit:
                rejected[peer] = f"norm {norm:.3g} > {config.max_norm_ratio:g} x median"
    return set(norms) - set(rejected), rejected


def _norm(part: torch.Tensor) -> float:
    """L2 norm; in fp32 (fast), again in fp64 when that underflowed to 0 or overflowed
    (eight values of 1e-23 have an fp32 norm of 0, finite values near 1e20 one of inf)."""
    if not part.numel():
        return 0.0
    norm = float(torch.linalg.vector_norm(part))
    if (norm == 0.0 and bool(part.any())) or math.isinf(norm):
        norm = float(torch.linalg.vector_norm(part, dtype=torch.float64))
    return norm


def weighted_mean(
    parts: Sequence[torch.Tensor],
    weights: Sequence[float],
    out: torch.Tensor | None = None,
    *,
    fused: bool = True,
) -> torch.Tensor:
    """``sum(w_i x_i) / sum(w_i)`` accumulated in fp32, in the given order (into ``out``).

    ``fused=False`` rounds every product before it is added: the same bits on every CPU
    (a fused multiply-add rounds once, and where a CPU has one depends on the build and the
    machine), at one more pass over each part.
    """
    if not parts or len(parts) != len(weights):
        raise ValueError(f"need matching non-empty parts/weights, got {len(parts)}/{len(weights)}")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must sum to > 0, got {list(weights)}")
    out = torch.mul(parts[0], weights[0] / total, out=out)
    term = None if fused or len(parts) < 2 else torch.empty_like(out)
    for part, w in zip(parts[1:], weights[1:], strict=True):
        if term is None:
            out.add_(part, alpha=w / total)
        else:
            out.add_(torch.mul(part, w / total, out=term))
    return out


def _trimmed_mean(
    parts: Sequence[torch.Tensor], trim_fraction: float, *, fused: bool = True
) -> torch.Tensor:
    n = len(parts)
    # Round up: int(n * 0.2) trims nothing below five peers, where one liar decides the mean.
    k = min(math.ceil(n * trim_fraction), (n - 1) // 2)
    stacked = torch.stack(list(parts))
    kept = stacked.sort(dim=0).values[k : n - k] if k else stacked
    if fused:
        return kept.mean(dim=0)
    # Value by value, in one order: the same bits however the vector is cut into parts.
    out = kept[0].clone()
    for row in kept[1:]:
        out.add_(row)
    return out.div_(n - 2 * k)


def _median(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Coordinate-wise median; for an even count the mean of the two middle values
    (``torch.median`` takes the lower one, which would start a pair at its minimum)."""
    n = len(parts)
    if n % 2:
        return torch.stack(list(parts)).median(dim=0).values
    ordered = torch.stack(list(parts)).sort(dim=0).values
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def _centered_clip(
    parts: Sequence[torch.Tensor], weights: Sequence[float], radius: float, iterations: int
) -> torch.Tensor:
    center = _median(parts)
    cap = sorted(weights)[len(weights) // 2]
    weights = [min(w, cap) for w in weights]
    total = float(sum(weights))
    for _ in range(iterations):
        step = torch.zeros_like(center)
        for part, w in zip(parts, weights, strict=True):
            diff = part - center
            norm = float(torch.linalg.vector_norm(diff))
            scale = 1.0 if norm <= radius else radius / norm
            step.add_(diff, alpha=w * scale / total)
        center = center + step
    return center


def aggregate(
    parts: Sequence[torch.Tensor],
    weights: Sequence[float],
    config: AggregationConfig,
    out: torch.Tensor | None = None,
    *,
    fused: bool = True,
) -> torch.Tensor:
    """Combine accepted contributions according to ``config.kind`` (``mean`` fills ``out``).

    ``fused=False`` gives the same bits however the vector is cut into parts, on any CPU
    (see :func:`weighted_mean`); ``centered_clip`` has no such form (its clipping looks at
    whole parts)."""
    if config.kind == "mean":
        return weighted_mean(parts, weights, out, fused=fused)
    if config.kind == "trimmed_mean":
        return _trimmed_mean(parts, config.trim_fraction, fused=fused)
    return _centered_clip(parts, weights, config.clip_radius, config.clip_iterations)
