"""Which stage a server should serve: pure decisions over announced throughputs.

Every micro-batch crosses every stage once, so demand is the same for all stages and the
pipeline runs at the speed of its least-served stage (the bottleneck: smallest summed
throughput). ``initial_stage`` picks the least-served stage for a peer that starts with
``--stage auto``. ``choose_move`` decides whether a running server should move:

* it never leaves a stage it serves alone (that would open a hole);
* a stage that nobody serves is filled first (from the best-served stage that has spares);
* otherwise it moves from its stage ``s`` to the bottleneck ``t`` only if the bottleneck
  after the move, ``min(T_s - mine, T_t + mine)`` over the two stages involved, exceeds the
  current bottleneck ``T_t`` by more than ``hysteresis`` (a fraction), and only after
  ``min_dwell_s`` on its current stage. With hysteresis > 0 two servers cannot trade places
  back and forth: a move that pays now would have to pay again, by the same margin, in the
  other direction.

Servers of one stage decide from the same announcements, so they would all move at once. To
prevent that each is given its ``rank`` among its stage's servers (by PeerID): to fill empty
stages, ranks ``0..min(spares, holes) - 1`` move (rank ``r`` to the ``r``-th hole) and the rest
stay; a throughput move is made by rank 0 only. The others see the result in the DHT at
their next evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["choose_move", "initial_stage", "stage_totals"]


def stage_totals(num_stages: int, servers: Sequence[tuple[int, float]]) -> list[float]:
    """Summed throughput per stage from (stage, throughput) pairs (unknown stages ignored)."""
    totals = [0.0] * num_stages
    for stage, throughput in servers:
        if 0 <= stage < num_stages:
            totals[stage] += max(0.0, throughput)
    return totals


def initial_stage(counts: Sequence[int], totals: Sequence[float]) -> int:
    """The stage a new peer should serve: an unserved one first, else the least throughput."""
    for stage, count in enumerate(counts):
        if count == 0:
            return stage
    return min(range(len(totals)), key=lambda s: (totals[s], counts[s], s))


def choose_move(
    current: int,
    rank: int,
    mine: float,
    counts: Sequence[int],
    totals: Sequence[float],
    *,
    hysteresis: float,
    since_move_s: float,
    min_dwell_s: float,
) -> int | None:
    """The stage to move to, or None to stay (see the module docstring).

    Args:
        current: the stage this server serves (counted in ``counts``/``totals``).
        rank: this server's position among the servers of ``current`` (sorted by PeerID).
        mine: this server's throughput (samples/s).
        counts, totals: servers and summed throughput per stage, this server included.
        hysteresis: required relative gain of the bottleneck.
        since_move_s: time since this server last moved (or started).
        min_dwell_s: minimum time on a stage.
    """
    if since_move_s < min_dwell_s or counts[current] <= 1:
        return None
    empty = [s for s, n in enumerate(counts) if n == 0]
    if empty:
        spare = max(
            (s for s, n in enumerate(counts) if n > 1), key=lambda s: (counts[s], totals[s], -s)
        )
        if spare != current or rank >= min(counts[current] - 1, len(empty)):
            return None
        return empty[rank]
    if rank != 0:
        return None
    target = min(range(len(totals)), key=lambda s: (totals[s], s))
    if target == current:
        return None
    after = min(totals[current] - mine, totals[target] + mine)
    if after > totals[target] * (1.0 + hysteresis):
        return target
    return None
