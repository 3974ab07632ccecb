"""Joining the swarm: ping a list of bootstrap addresses with bounded, jittered retries.

Any address may be down. Each round pings every address, in parallel, each with the RPC
deadline; rounds are separated by exponential backoff with jitter (``shoal.net``'s one
``RetryPolicy``), and the whole join has the policy's overall deadline. When nobody answers, ``join`` raises
``PeerUnavailable`` naming every address and its last error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shoal.dht.ids import Contact
from shoal.errors import ConfigError, NetworkError, PeerUnavailable
from shoal.net.config import RetryPolicy
from shoal.net.retry import backoff_s

if TYPE_CHECKING:
    from shoal.dht.node import DHTNode

__all__ = ["BOOTSTRAP_RETRY", "REJOIN_RETRY", "RetryPolicy", "join"]


BOOTSTRAP_RETRY = RetryPolicy(
    initial_s=0.5, max_s=8.0, factor=2.0, jitter=0.2, attempts=4, deadline_s=30.0
)
"""Default for joining: 4 rounds, pauses of about 0.5, 1, 2 s, all within 30 s."""

REJOIN_RETRY = RetryPolicy(initial_s=0.5, max_s=0.5, attempts=1, deadline_s=5.0)
"""Periodic re-joins from maintenance: one round of pings, no waiting on unreachable seeds."""


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
        pause = min(backoff_s(policy, attempt + 1, node.rng.random()), deadline - loop.time())
        if attempt + 1 < policy.attempts and pause > 0:
            await asyncio.sleep(pause)
    detail = "; ".join(f"{a}: {e}" for a, e in errors.items()) or "deadline passed"
    raise PeerUnavailable(
        f"none of the {len(pending)} bootstrap address(es) answered after "
        f"{policy.attempts} attempt(s): {detail}"
    )
