"""Top-k averaging of pseudo-gradients, with error feedback.

Instead of the whole pseudo-gradient, a peer sends the ``k`` largest-magnitude values of
``M = Δ + e`` (``e``: what its earlier rounds did not send) as (position, value) pairs, the
``sparse`` wire codec; the swarm's weighted mean of those sparse vectors is the outer step's
input. What was not sent stays in ``e`` and goes out in later rounds: nothing is lost, only
delayed (``compress/topk.py``; ``Δ`` itself may arrive scaled, when it carries steps the
swarm stepped past: ``outer.one_round_share``). Peers pick different positions, so a mean
holds up to ``contributors x k`` non-zeros; the codec sends a result part dense once half
of it is non-zero, so no part costs more than fp32.

Commit rule, as for the low-rank averager: ``e`` becomes ``M - sent`` only when this peer's
values are in the mean (round ok and this peer included). Otherwise nothing of it was
applied: the local progress stays in the model for the next round's ``Δ`` and ``e`` is
kept as it was. ``e`` belongs to this peer alone (its own progress that the swarm has not
seen): a resync keeps it, checkpoints write it to the peer's own disk (``local_state``,
never served), and a restart takes it back from there, even when the rest of its state
comes from a donor (``swarm_state.keep_own_local`` says when).

Bytes per round: about ``8 k`` per contribution against ``4 n`` for fp32, and the mean's
union of positions on the way back (dense when that is smaller).
"""

from __future__ import annotations

import torch

from shoal.compress.topk import ErrorFeedback, TopKCodec
from shoal.errors import ConfigError
from shoal.train.diloco_lowrank import RawAverage
from shoal.train.swarm_round_config import RoundOutcome

__all__ = ["TopKAverager"]

WIRE_CODEC = "sparse"
"""The wire codec top-k vectors travel in."""
_RESIDUAL = "local.topk.residual"


class TopKAverager:
    """Averages a flat pseudo-gradient through its top ``fraction`` of values (see module doc)."""

    def __init__(self, fraction: float) -> None:
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"topk fraction must be in (0, 1), got {fraction!r}")
        self.codec = TopKCodec(fraction=fraction)
        self.feedback = ErrorFeedback()

    def average(
        self, delta: torch.Tensor, weight: float, index: int, raw: RawAverage
    ) -> RoundOutcome:
        """Replace ``delta`` (flat fp32) by the mean of the contributors' top-k vectors, in
        place when the round succeeds; on failure ``delta`` and ``e`` are untouched."""
        kept_before = self.feedback.residual
        encoded = self.codec.encode(delta, self.feedback)  # sets e = M - sent (a new tensor)
        residual_if_sent, self.feedback.residual = self.feedback.residual, kept_before
        vector = self.codec.decode(encoded).reshape(-1)
        outcome = raw(vector, weight, index, 0)
        if not outcome.ok:
            return outcome
        delta.copy_(vector)
        if outcome.included:
            self.feedback.residual = residual_if_sent
        return outcome

    def local_state(self) -> dict[str, torch.Tensor]:
        """The error feedback, for this peer's own checkpoints (none before a round)."""
        r = self.feedback.residual
        return {} if r is None else {_RESIDUAL: r}

    def load_local_state(self, tensors: dict[str, torch.Tensor], numel: int) -> bool:
        """Take the error feedback back from a checkpoint of this peer; False (and none
        kept) when it is missing or not ``numel`` fp32 values."""
        r = tensors.get(_RESIDUAL)
        ok = r is not None and r.dtype == torch.float32 and r.numel() == numel
        self.feedback.residual = r.reshape(-1).clone() if ok and r is not None else None
        return ok
