"""Who reduces which slice of the flat parameter vector.

A group all-reduces one flat fp32 vector. It is cut into contiguous parts, one per
member; member ``i`` *reduces* part ``i``. Shares are planned from the members' measured
uplinks and downlinks (:func:`plan_shares`); members in *client mode* (relayed, or unable
to accept connections) get share 0: they send their parts and receive results but reduce
nothing.

``flatten`` views a list of tensors as one flat vector without copying when the tensors
already lie back to back in one storage (a flat parameter buffer); otherwise it copies,
and ``write_back`` copies results into the original tensors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from shoal.errors import ConfigError

__all__ = [
    "FlatVector",
    "flatten",
    "modeled_round_time",
    "part_ranges",
    "plan_shares",
    "split_sizes",
]


def plan_shares(
    uplinks_bps: Sequence[float],
    downlinks_bps: Sequence[float] | None = None,
    client_mode: Sequence[bool] | None = None,
) -> list[float]:
    """Fractions of the vector each member reduces: sum 1, clients get 0, and the
    :func:`modeled_round_time` of the result is the least any shares give (within 1e-6);
    among splits that fast, the one nearest equal shares.

    ``downlinks_bps`` default to the uplinks (symmetric links); a downlink of 0 means not
    measured and is taken as that member's uplink. The result is a pure function of the
    arguments, computed with the same float operations everywhere, so every member of a
    group derives the same shares from the same announcements.

    Raises:
        ConfigError: lengths differ, a rate is not finite and > 0 (a downlink also 0), or
            every member is a client.
    """
    ups, downs, clients = _links(uplinks_bps, downlinks_bps, client_mode)
    if all(clients):
        raise ConfigError("no member can reduce: all are clients")
    return list(_plan(tuple(ups), tuple(downs), tuple(clients)))


def modeled_round_time(
    shares: Sequence[float],
    uplinks_bps: Sequence[float],
    downlinks_bps: Sequence[float] | None = None,
) -> float:
    """Seconds per bit of the vector that a round with ``shares`` takes in the link model.

    In the reduce-scatter each member sends the parts it does not reduce (``1 - s``) and
    receives its own part from the ``n - 1`` others; in the all-gather it sends its result
    to them and receives the rest. Each phase lasts as long as its busiest link, and the
    phases follow one another. Latency and CPU are left out: shares matter when links are
    the bottleneck.
    """
    ups, downs, _ = _links(uplinks_bps, downlinks_bps, None)
    if len(shares) != len(ups):
        raise ConfigError(f"{len(shares)} shares for {len(ups)} members")
    n = len(ups)
    scatter = max(
        max((1 - s) / u, (n - 1) * s / d) for s, u, d in zip(shares, ups, downs, strict=True)
    )
    gather = max(
        max((n - 1) * s / u, (1 - s) / d) for s, u, d in zip(shares, ups, downs, strict=True)
    )
    return scatter + gather


def _links(
    uplinks_bps: Sequence[float],
    downlinks_bps: Sequence[float] | None,
    client_mode: Sequence[bool] | None,
) -> tuple[list[float], list[float], list[bool]]:
    n = len(uplinks_bps)
    downs = list(downlinks_bps) if downlinks_bps is not None else [0.0] * n
    clients = list(client_mode) if client_mode is not None else [False] * n
    if n == 0 or len(downs) != n or len(clients) != n:
        raise ConfigError(
            f"need members: {n} uplinks, {len(downs)} downlinks, {len(clients)} client flags"
        )
    ups = [float(u) for u in uplinks_bps]
    for i, (up, down) in enumerate(zip(ups, downs, strict=True)):
        if not (math.isfinite(up) and up > 0):
            raise ConfigError(f"uplinks_bps[{i}] must be finite and > 0, got {up!r}")
        if not (math.isfinite(down) and down >= 0):
            raise ConfigError(f"downlinks_bps[{i}] must be finite and >= 0, got {down!r}")
    return ups, [float(d) if d > 0 else u for u, d in zip(ups, downs, strict=True)], clients


_SLACK = 1e-12
_SEARCH_STEPS = 40
"""Bisection and golden-section steps (intervals shrink to 4e-9 of their width or less)."""


@functools.lru_cache(maxsize=64)
def _plan(
    ups: tuple[float, ...], downs: tuple[float, ...], clients: tuple[bool, ...]
) -> tuple[float, ...]:
    """The shares minimising ``scatter + gather`` of :func:`modeled_round_time`.

    For phase lengths ``a`` (reduce-scatter) and ``b`` (all-gather), member ``i`` fits iff
    its share lies in ``[lo_i, hi_i]``: ``s >= 1 - a*u`` and ``s <= a*d/(n-1)`` (it sends
    what it does not reduce, receives its part), ``s <= b*u/(n-1)`` and ``s >= 1 - b*d``
    (sends its result, receives the rest). Shares exist iff every interval is non-empty
    and ``sum(lo) <= 1 <= sum(hi)``. The constraints are linear in ``(s, a, b)``, so the
    least feasible ``b`` is convex in ``a``: a golden-section search over ``a`` with a
    bisection for ``b`` inside finds the optimum; the shares are then the ones nearest
    equal within their intervals (:func:`_nearest_equal`).
    """
    n = len(ups)
    if n == 1:
        return (1.0,)
    top = max(max(ups), max(downs))  # work in O(1) numbers
    u = [x / top for x in ups]
    d = [x / top for x in downs]
    k = n - 1

    def bounds(a: float, b: float) -> tuple[list[float], list[float]]:
        lo = [max(0.0, 1 - a * ui, 1 - b * di) for ui, di in zip(u, d, strict=True)]
        hi = [
            0.0 if c else min(1.0, a * di / k, b * ui / k)
            for ui, di, c in zip(u, d, clients, strict=True)
        ]
        return lo, hi

    def fits(a: float, b: float) -> bool:
        lo, hi = bounds(a, b)  # a bound met exactly may miss by a rounding error
        return (
            all(x <= y + _SLACK for x, y in zip(lo, hi, strict=True))
            and math.fsum(lo) <= 1 + _SLACK <= math.fsum(hi) + 2 * _SLACK
        )

    # Past these, a phase's own constraints bind no member (each is feasible alone).
    a_cap = max(max(1 / x for x in u), k / min(d))
    b_cap = max(max(1 / x for x in d), k / min(u))

    def best_b(a: float) -> float:
        return _least(lambda b: fits(a, b), 0.0, b_cap)

    a_low = _least(lambda a: fits(a, b_cap), 0.0, a_cap)
    # The optimum's a is at most the whole time of the least feasible a (b >= 0).
    a_high = min(a_cap, a_low + best_b(a_low))
    ratio = (math.sqrt(5) - 1) / 2
    x1 = a_high - ratio * (a_high - a_low)
    x2 = a_low + ratio * (a_high - a_low)
    f1, f2 = x1 + best_b(x1), x2 + best_b(x2)
    for _ in range(_SEARCH_STEPS):
        if f1 <= f2:
            a_high, x2, f2 = x2, x1, f1
            x1 = a_high - ratio * (a_high - a_low)
            f1 = x1 + best_b(x1)
        else:
            a_low, x1, f1 = x1, x2, f2
            x2 = a_low + ratio * (a_high - a_low)
            f2 = x2 + best_b(x2)
    a = x1 if f1 <= f2 else x2
    lo, hi = bounds(a, best_b(a))
    lo = [min(low, h) for low, h in zip(lo, hi, strict=True)]  # the slack fits allowed
    return _nearest_equal(lo, hi, clients)


def _least(
    feasible: Callable[[float], bool], low: float, high: float, steps: int = _SEARCH_STEPS
) -> float:
    """Bisection: the least ``x`` in ``(low, high]`` that is ``feasible`` (a monotone
    predicate, true at ``high``), to within ``(high - low) / 2**steps`` above it."""
    for _ in range(steps):
        mid = 0.5 * (low + high)
        low, high = (low, mid) if feasible(mid) else (mid, high)
    return high


def _nearest_equal(
    lo: list[float], hi: list[float], clients: tuple[bool, ...]
) -> tuple[float, ...]:
    """Shares in ``[lo, hi]`` summing to 1, as close to equal as the bounds allow: where
    several splits are as fast (equal links, or a member whose share barely matters), the
    work stays spread. ``clip(1/m + mu, lo, hi)`` with ``mu`` bisected to make the sum 1."""
    equal = 1.0 / sum(1 for c in clients if not c)
    target = [0.0 if c else equal for c in clients]

    def total(mu: float) -> float:
        return math.fsum(min(h, max(low, t + mu)) for t, low, h in zip(target, lo, hi, strict=True))

    mu = _least(lambda mu: total(mu) >= 1.0, -1.0, 1.0, steps=_SEARCH_STEPS + 20)
    shares = [min(h, max(low, t + mu)) for t, low, h in zip(target, lo, hi, strict=True)]
    whole = math.fsum(shares)
    return tuple(s / whole for s in shares)


def split_sizes(total: int, shares: Sequence[float]) -> list[int]:
    """Integer part sizes summing to ``total``, proportional to ``shares`` (largest remainder).

    A member with share 0 always gets size 0.
    """
    if total < 0:
        raise ConfigError(f"total must be >= 0, got {total}")
    weight = math.fsum(shares)
    if weight <= 0 or any(s < 0 or not math.isfinite(s) for s in shares):
        raise ConfigError(f"shares must be finite, >= 0 and not all zero, got {list(shares)}")
    exact = [total * s / weight for s in shares]
    sizes = [math.floor(e) for e in exact]
    left = total - sum(sizes)
    order = sorted(
        (i for i, s in enumerate(shares) if s > 0), key=lambda i: (sizes[i] - exact[i], i)
    )
    for i in order[:left]:
        sizes[i] += 1
    return sizes


def part_ranges(total: int, shares: Sequence[float], align: int = 1) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of each member's part of a ``total``-element vector; with
    ``align``, every part starts at a multiple of it (the nearest to its share)."""
    if align < 1:
        raise ConfigError(f"align must be >= 1, got {align!r}")
    ranges = []
    start = end = 0
    for size in split_sizes(total, shares):
        end += size
        cut = end if end == total else min(total, max(start, align * round(end / align)))
        ranges.append((start, cut))
        start = cut
    return ranges


class FlatVector:
    """A flat fp32 view of a list of tensors, copied only when they are not contiguous."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.tensors = list(tensors)
        if not self.tensors:
            raise ConfigError("cannot average an empty list of tensors")
        for i, t in enumerate(self.tensors):
            if t.dtype != torch.float32:
                raise ConfigError(f"tensors[{i}] has dtype {t.dtype}; averaging needs float32")
        self.flat, self.is_view = _flat_view(self.tensors)

    @property
    def numel(self) -> int:
        return self.flat.numel()

    def write_parts(
        self, ranges: Sequence[tuple[int, int]], parts: dict[int, torch.Tensor]
    ) -> None:
        """Store each ``parts[j]`` at ``ranges[j]`` of the flat vector, then into the tensors."""
        with torch.no_grad():
            for j, part in parts.items():
                a, b = ranges[j]
                self.flat[a:b].copy_(part)
        if not self.is_view:
            self.write_back(self.flat)

    def write_back(self, result: torch.Tensor) -> None:
        """Store a flat result of the same size into the original tensors."""
        if result.numel() != self.numel:
            raise ValueError(f"result has {result.numel()} elements, expected {self.numel}")
        if self.is_view:
            if result.data_ptr() != self.flat.data_ptr():
                self.flat.copy_(result)
            return
        offset = 0
        with torch.no_grad():
            for t in self.tensors:
                n = t.numel()
                t.copy_(result[offset : offset + n].view_as(t))
                offset += n


def flatten(tensors: Sequence[torch.Tensor]) -> FlatVector:
    """Shorthand for :class:`FlatVector`."""
    return FlatVector(tensors)


def _flat_view(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    first = tensors[0]
    if len(tensors) == 1 and first.is_contiguous():
        return first.detach().view(-1), True
    storage = first.untyped_storage()
    expected = first.storage_offset()
    for t in tensors:
        if (
            not t.is_contiguous()
            or t.untyped_storage().data_ptr() != storage.data_ptr()
            or t.storage_offset() != expected
        ):
            return torch.cat([t.detach().reshape(-1) for t in tensors]), False
        expected += t.numel()
    total = expected - first.storage_offset()
    flat = torch.empty(0, dtype=first.dtype).set_(storage, first.storage_offset(), (total,), (1,))
    return flat, True
