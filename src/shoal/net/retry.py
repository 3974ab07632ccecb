"""Backoff arithmetic for ``RetryPolicy`` (pure: randomness and time come in as arguments).

``backoff_s(policy, failures, u)`` is the wait after ``failures`` consecutive failures, with
``u`` uniform in [0, 1) supplying the jitter. ``Backoff`` tracks one target (an address):
when it may be tried next, reset on success.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.net.config import RetryPolicy


def backoff_s(policy: RetryPolicy, failures: int, u: float) -> float:
    """Delay after ``failures`` (>= 1) consecutive failures; 0 when there were none."""
    if failures <= 0:
        return 0.0
    base = min(policy.initial_s * policy.factor ** (failures - 1), policy.max_s)
    return min(base * (1.0 - policy.jitter + 2.0 * policy.jitter * u), policy.max_s)


def may_retry(policy: RetryPolicy, attempts_done: int, elapsed_s: float, delay_s: float) -> bool:
    """Whether another attempt fits the policy's attempt count and overall deadline."""
    return attempts_done < policy.attempts and elapsed_s + delay_s < policy.deadline_s


@dataclass(slots=True)
class Backoff:
    """Consecutive failures of one target and the earliest time it may be tried again."""

    failures: int = 0
    next_try_s: float = 0.0

    def failed(self, policy: RetryPolicy, now_s: float, u: float) -> float:
        """Record a failure at ``now_s``; returns the wait before the next try."""
        self.failures += 1
        delay = backoff_s(policy, self.failures, u)
        self.next_try_s = now_s + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.next_try_s = 0.0

    def wait_s(self, now_s: float) -> float:
        """How long until the target may be tried (0 = now)."""
        return max(0.0, self.next_try_s - now_s)


__all__ = ["Backoff", "backoff_s", "may_retry"]
