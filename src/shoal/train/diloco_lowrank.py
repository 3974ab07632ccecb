"""Low-rank (PowerSGD-style) averaging of pseudo-gradients, with error feedback.

A DiLoCo round moves the whole pseudo-gradient; this compressor moves two small factors per
matrix instead, in two all-reduces (the second one among the first one's contributors, with
no matchmaking: ``SwarmRounds.again``). For every matrix ``M_i = Δ_i + e_i`` (``e_i``: this
peer's error feedback; tensors with more than two dims are viewed as ``(shape[0], -1)``):

    1. P_i = M_i Q              all-reduce (weighted mean) → P̄;  P̂ = orthonormal basis of P̄
    2. R_i = M_iᵀ P̂             all-reduce → R̄
    3. mean ≈ P̂ R̄ᵀ  (= P̂ P̂ᵀ · mean of M);   e_i ← M_i - P̂ R_iᵀ;   Q ← R̄ (warm start)

Vectors (biases, norms) and small matrices travel dense in the second all-reduce, next to
the ``R_i``, so every value applied is a mean over that exchange's contributors, the set
the round reports. (The second exchange may leave out a member the first one counted: with
the dense values in the first, that member's were in the applied mean while it kept its
progress for the next round, which sent them again.) ``P̂`` only picks the basis the
matrices are projected on. ``Q`` is derived from the averaged ``R̄``, so it is the same on
every contributor; it is part of the outer state (``state_tensors``, prefix
``outer.lowrank.``) so a peer that resyncs from the swarm adopts it too. The error feedback
is this peer's own: checkpoints write it to its disk (``local_state``, prefix ``local.``),
never to other peers. The first ``Q`` is a seeded random orthonormal matrix (same seed on
every peer). One power iteration per round, warm-started, as in PowerSGD.

Commit rule: the result is written only when both all-reduces succeed; otherwise the
pseudo-gradient, ``Q`` and the error feedback are untouched and the round fails. That
includes a member the first all-reduce left out: no second result comes to it, so it takes
the swarm's outer state at its next round (DiLoCo's resync) instead of the step now.
Bytes per round: ``rank·(n + m)`` values per ``n×m`` matrix instead of ``n·m``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from shoal.errors import CheckpointError, ConfigError
from shoal.train.outer import fp32_copy
from shoal.train.swarm_round_config import RoundOutcome

__all__ = ["LowRankAverager"]

# raw(vector, weight, index, stage) averages in place; stage 0 meets the swarm, 1 reuses it.
RawAverage = Callable[[torch.Tensor, float, int, int], RoundOutcome]


class LowRankAverager:
    """Averages a flat pseudo-gradient through rank-``rank`` factors (see module doc)."""

    def __init__(self, shapes: Sequence[torch.Size], rank: int, *, seed: int = 0) -> None:
        if rank < 1:
            raise ConfigError(f"rank must be >= 1, got {rank!r}")
        self.rank = rank
        self.shapes = [torch.Size(s) for s in shapes]
        self.sizes = [s.numel() for s in self.shapes]
        self.matrices: list[int] = []
        for i, s in enumerate(self.shapes):
            if len(s) >= 2:
                n, m = s[0], s.numel() // s[0]
                if rank * (n + m) < n * m // 2:  # worth compressing
                    self.matrices.append(i)
        if not self.matrices:
            useful = [
                (s[0] * (s.numel() // s[0]) // 2 - 1) // (s[0] + s.numel() // s[0])
                for s in self.shapes
                if len(s) >= 2
            ]
            best = max(useful, default=0)
            raise ConfigError(
                f"rank {rank} compresses none of the model's matrices"
                + (f" (at most rank {best} does)" if best >= 1 else " (it has none to compress)")
            )
        self.dense = [i for i in range(len(self.shapes)) if i not in self.matrices]
        g = torch.Generator().manual_seed(seed)
        self.q: dict[int, torch.Tensor] = {}
        self.error: dict[int, torch.Tensor] = {}
        for i in self.matrices:
            n, m = self._nm(i)
            self.q[i] = torch.linalg.qr(torch.randn(m, rank, generator=g)).Q.contiguous()
            self.error[i] = torch.zeros(n, m)

    def _nm(self, i: int) -> tuple[int, int]:
        s = self.shapes[i]
        return s[0], s.numel() // s[0]

    def wire_numel(self) -> int:
        """Values sent per round (both all-reduces), against ``sum(sizes)`` uncompressed."""
        lowrank = sum(self.rank * sum(self._nm(i)) for i in self.matrices)
        return lowrank + sum(self.sizes[i] for i in self.dense)

    def average(
        self, delta: torch.Tensor, weight: float, index: int, raw: RawAverage
    ) -> RoundOutcome:
        """Replace ``delta`` (flat fp32) by the low-rank mean over the contributors, in place."""
        views = list(torch.split(delta, self.sizes))
        m = {i: views[i].view(self._nm(i)) + self.error[i] for i in self.matrices}
        first = torch.cat([(m[i] @ self.q[i]).reshape(-1) for i in self.matrices])
        out1 = raw(first, weight, index, 0)
        if not out1.ok:
            return out1
        if not out1.included:
            return _left_out_of_first(out1)
        p_hat: dict[int, torch.Tensor] = {}
        offset = 0
        for i in self.matrices:
            n, _ = self._nm(i)
            p_bar = first[offset : offset + n * self.rank].view(n, self.rank)
            offset += n * self.rank
            p_hat[i] = torch.linalg.qr(p_bar).Q
        local_r = {i: m[i].T @ p_hat[i] for i in self.matrices}
        # Dense values go with the R factors: the applied mean is over one set, the second's.
        second = torch.cat(
            [local_r[i].reshape(-1) for i in self.matrices] + [views[i] for i in self.dense]
        )
        out2 = raw(second, weight, index, 1)
        seconds = {**out1.seconds}
        for k, v in out2.seconds.items():
            seconds[k] = seconds.get(k, 0.0) + v
        if not out2.ok:
            return RoundOutcome(
                False, group_size=out2.group_size, reason=f"second: {out2.reason}", seconds=seconds
            )
        offset = 0
        for i in self.matrices:
            _, cols = self._nm(i)
            r_bar = second[offset : offset + cols * self.rank].view(cols, self.rank)
            offset += cols * self.rank
            views[i].copy_((p_hat[i] @ r_bar.T).reshape(-1))
            if out2.included:  # else none of our values is in the mean: the caller keeps them
                self.error[i] = m[i] - p_hat[i] @ local_r[i].T
            self.q[i] = r_bar.clone()  # the same at every member: next round's warm start
        for i in self.dense:
            views[i].copy_(second[offset : offset + self.sizes[i]])
            offset += self.sizes[i]
        return RoundOutcome(
            True,
            contributors=out2.contributors,
            weight=out2.weight,
            group_size=out2.group_size,
            reason=out2.reason,
            seconds=seconds,
            included=out2.included,
            expected=out1.expected,  # what the first exchange's membership view counted
        )

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"outer.lowrank.q.{i}": q for i, q in self.q.items()}

    def state_misfit(self, tensors: dict[str, torch.Tensor]) -> str | None:
        """Why :meth:`load_state_tensors` would refuse ``tensors`` (None: it takes them):
        a ``Q`` missing or of another rank (a snapshot of other settings)."""
        try:
            _read_matching(tensors, "outer.lowrank.q.", self.q)
        except CheckpointError as exc:
            return str(exc)
        return None

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Adopt the swarm's ``Q``; False (nothing changed) when :meth:`state_misfit`."""
        loaded = _matching(tensors, "outer.lowrank.q.", self.q)
        if loaded is None:
            return False
        self.q = loaded
        return True

    def local_state(self) -> dict[str, torch.Tensor]:
        """The error feedback, for this peer's own checkpoints (never served)."""
        return {f"local.lowrank.error.{i}": e for i, e in self.error.items()}

    def load_local_state(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Take the error feedback back from a checkpoint of this peer; False (nothing
        changed) when any matrix's is missing or misshapen."""
        loaded = _matching(tensors, "local.lowrank.error.", self.error)
        if loaded is None:
            return False
        self.error = loaded
        return True


def _left_out_of_first(out1: RoundOutcome) -> RoundOutcome:
    """The second exchange runs among the first one's contributors, so no ``R̄`` comes to a
    member the first left out: it cannot take their outer step in this round. The round
    fails (progress, samples and error feedback stay) with its time and membership count,
    and DiLoCo's resync takes the swarm's outer state (``Q`` too) before the next round,
    where a plain round that left the peer out would have put it."""
    return RoundOutcome(
        False,
        group_size=out1.group_size,
        reason=f"first: {out1.reason}; the second exchange runs without this peer",
        seconds=dict(out1.seconds),
        expected=out1.expected,
    )


def _matching(
    tensors: dict[str, torch.Tensor], prefix: str, like: dict[int, torch.Tensor]
) -> dict[int, torch.Tensor] | None:
    """:func:`_read_matching`, or None when it refuses."""
    try:
        return _read_matching(tensors, prefix, like)
    except CheckpointError:
        return None


def _read_matching(
    tensors: dict[str, torch.Tensor], prefix: str, like: dict[int, torch.Tensor]
) -> dict[int, torch.Tensor]:
    """``tensors[prefix + i]`` for every ``i`` of ``like`` as fp32 copies.

    Raises:
        CheckpointError: one is missing or does not fit (``outer.fp32_copy``).
    """
    return {i: fp32_copy(f"{prefix}{i}", tensors.get(f"{prefix}{i}"), t) for i, t in like.items()}
