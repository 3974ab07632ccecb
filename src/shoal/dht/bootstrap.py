"""Joining the swarm: ping a list of bootstrap addresses with bounded, jittered retries.

Any address may be down. Each round pings every address that has not answered yet, in
parallel, each with the RPC deadline; rounds are separated by exponential backoff with
jitter, and the whole join has an overall deadline. When nobody answers, ``join`` raises
``PeerUnavailable`` naming every address and its last error.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shoal.dht.ids import Contact
from shoal.errors import ConfigError, NetworkError, PeerUnavailable

if TYPE_CHECKING:
    from shoal.dht.node import DHTNode

__all__ = ["RetryPolicy", "join"]


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter."""

    attempts: int = 4
    """Rounds of pings before giving up."""
    initial_delay_s: float = 0.5
    """Pause after the first failed round."""
    max_delay_s: float = 8.0
    """Cap on the pause between rounds."""
    factor: float = 2.0
    """Growth of the pause per round."""
    jitter: float = 0.2
    """Pauses are multiplied by a uniform factor in [1 - jitter, 1 + jitter]."""
    deadline_s: float = 30.0
    """Overall limit for the whole join."""

    def __post_init__(self) -> None:
        for name in ("attempts", "initial_delay_s", "max_delay_s", "factor", "deadline_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"RetryPolicy.{name} must be > 0, got {value!r}")
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"RetryPolicy.jitter must be in [0, 1), got {self.jitter!r}")

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        """Pause after failed round ``attempt`` (0-based)."""
        base = min(self.max_delay_s, self.initial_delay_s * self.factor**attempt)
        return base * rng.uniform(1 - self.jitter, 1 + self.jitter)


async def join(node: DHTNode, addresses: Sequence[str], policy: RetryPolicy) -> list[Contact]:
    """Contacts of the bootstrap addresses that answered (at least one), else PeerUnavailable."""
    own = node.contact.address if node.contact else None
    pending = [a for a in dict.fromkeys(addresses) if a != own]
    if not pending:
        raise ConfigError(f"no bootstrap address to join (got {list(addresses)!r})")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + policy.deadline_s
    errors: dict[str, str] = {}
    found: list[Contact] = []
    for attempt in range(policy.attempts):
        timeout_s = min(node.config.rpc_timeout_s, max(0.0, deadline - loop.time()))
        if timeout_s <= 0:
            break
        answers = await asyncio.gather(
            *(node.transport.ping_address(a, timeout_s=timeout_s) for a in pending),
            return_exceptions=True,
        )
        for address, answer in zip(pending, answers, strict=True):
            if isinstance(answer, Contact):
                found.append(answer)
            elif isinstance(answer, NetworkError):
                errors[address] = str(answer) or type(answer).__name__
            elif isinstance(answer, BaseException):
                raise answer
        if found:
            return found
        pause = min(policy.delay_s(attempt, node.rng), deadline - loop.time())
        if attempt + 1 < policy.attempts and pause > 0:
            await asyncio.sleep(pause)
    detail = "; ".join(f"{a}: {e}" for a, e in errors.items()) or "deadline passed"
    raise PeerUnavailable(
        f"none of the {len(pending)} bootstrap address(es) answered after "
        f"{policy.attempts} attempt(s): {detail}"
    )
