"""A stage server's memory of micro-batches: saved forwards and applied backwards.

Used on the compute thread only. Rules (the accounting contract of a server):

* ``save(rid, ctx, now)`` keeps a forward's autograd context (its input and output) until the
  backward comes. At most ``max_saved`` are kept (the oldest is dropped beyond it) and each
  lives ``ttl_s`` (a micro-batch the trainer abandoned must not pin memory forever).
* ``take(rid)`` removes and returns it for its backward; ``mark_applied(rid, mb, answer)``
  records that the gradient of ``rid`` went into the accumulator. A request id is applied at
  most once: a repeated backward finds ``applied(rid)`` and gets the cached ``answer`` (the
  encoded input gradient) without touching the gradients again.
* Applied ids are remembered ``applied_ttl_s``; cached answers only for the newest
  ``max_saved`` (a duplicate older than that is answered UNKNOWN_REQUEST, never re-applied).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Ledger", "LedgerCounters"]


@dataclass(slots=True)
class LedgerCounters:
    forwards: int = 0
    """Forward passes computed."""
    applied: int = 0
    """Backward passes whose gradient was accumulated (each request id once)."""
    duplicates: int = 0
    """Repeated backwards answered from the cache (not applied again)."""
    expired: int = 0
    """Saved forwards dropped (abandoned, over capacity, or on a stage move)."""
    late: int = 0
    """Requests dropped because their budget ran out before they were computed or applied."""
    applied_micro_batches: list[int] = field(default_factory=list)
    """The trainer's micro-batch numbers of the applied backwards, in order (bounded)."""


class Ledger:
    """Saved forward contexts and applied request ids (see the module docstring)."""

    def __init__(
        self, *, max_saved: int, ttl_s: float, applied_ttl_s: float, max_history: int = 1 << 20
    ) -> None:
        self.max_saved, self.ttl_s, self.applied_ttl_s = max_saved, ttl_s, applied_ttl_s
        self.max_history = max_history
        self.counters = LedgerCounters()
        self._saved: collections.OrderedDict[bytes, tuple[float, Any]] = collections.OrderedDict()
        self._applied: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._answers: collections.OrderedDict[bytes, Any] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._saved)

    def sweep(self, now: float) -> None:
        """Drop expired contexts and forget old applied ids."""
        while self._saved and next(iter(self._saved.values()))[0] < now - self.ttl_s:
            self._saved.popitem(last=False)
            self.counters.expired += 1
        while self._applied and next(iter(self._applied.values())) < now - self.applied_ttl_s:
            rid, _ = self._applied.popitem(last=False)
            self._answers.pop(rid, None)

    def save(self, rid: bytes, ctx: Any, now: float) -> None:
        self.sweep(now)
        self._saved[rid] = (now, ctx)
        while len(self._saved) > self.max_saved:
            self._saved.popitem(last=False)
            self.counters.expired += 1

    def take(self, rid: bytes) -> Any | None:
        entry = self._saved.pop(rid, None)
        return None if entry is None else entry[1]

    def applied(self, rid: bytes) -> bool:
        return rid in self._applied

    def answer(self, rid: bytes) -> Any | None:
        return self._answers.get(rid)

    def mark_applied(self, rid: bytes, micro_batch: int, answer: Any, now: float) -> None:
        self._applied[rid] = now
        self._answers[rid] = answer
        while len(self._answers) > self.max_saved:
            self._answers.popitem(last=False)
        c = self.counters
        c.applied += 1
        if len(c.applied_micro_batches) < self.max_history:
            c.applied_micro_batches.append(micro_batch)

    def clear(self) -> None:
        """Drop every saved context (the server moves to another stage)."""
        self.counters.expired += len(self._saved)
        self._saved.clear()
