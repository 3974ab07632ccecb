"""Sending a round's messages: to several members at once, and a member's leave."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from shoal.errors import NetworkError
from shoal.parallel.data.messages import Leave, Member
from shoal.parallel.data.transport import RoundTransport

__all__ = ["send_all", "send_leave"]

_LEAVE_TIMEOUT_S = 1.0
"""How long a stopping member spends telling the others it leaves."""
_log = logging.getLogger(__name__)


async def send_all(
    transport: RoundTransport,
    sends: Sequence[tuple[Member, object]],
    deadline: float,
    *,
    log_level: int = logging.WARNING,
) -> dict[Member, str]:
    """Send concurrently; return the members that could not be reached, with the error.

    What could not be sent is logged in one line (``log_level``): a lost report costs the
    round its sender's part, and the round's outcome only names who was left out."""
    loop = asyncio.get_running_loop()
    failed: dict[Member, str] = {}

    async def one(to: Member, message: object) -> None:
        try:
            if to == transport.me:
                transport.inbox.deliver(message)  # type: ignore[arg-type]
            else:
                timeout = max(0.0, deadline - loop.time())
                await transport.send(to, message, timeout)  # type: ignore[arg-type]
        except (NetworkError, TimeoutError) as exc:
            failed[to] = f"{type(message).__name__}: {type(exc).__name__}: {exc}"

    tasks = [asyncio.ensure_future(one(to, message)) for to, message in sends]
    try:
        if tasks:
            await asyncio.wait(tasks)
    finally:
        for task in tasks:
            task.cancel()
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    if failed:
        rid = getattr(sends[0][1], "round_id", b"")
        lost = "; ".join(f"{to!r} ({why})" for to, why in list(failed.items())[:3])
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        _log.log(log_level, "round %s: not sent to %s%s", rid.hex()[:12], lost, more)
    return failed


async def send_leave(
    transport: RoundTransport, round_id: bytes, members: Sequence[Member], *, exact: bool = True
) -> None:
    """Tell the other ``members`` that this one leaves round ``round_id`` (best effort,
    within ``_LEAVE_TIMEOUT_S``; it never raises, so a cancelled caller stays cancelled).

    ``exact=False``: the others may run the round with a subset of ``members`` that this
    one cannot know (a follow-up exchange among the contributors they agreed on), so the
    leave names index 0, which every round has."""
    me = transport.me
    leave = Leave(round_id, me, list(members).index(me) if exact else 0)
    until = asyncio.get_running_loop().time() + _LEAVE_TIMEOUT_S
    with contextlib.suppress(Exception):
        await send_all(
            transport, [(m, leave) for m in members if m != me], until, log_level=logging.DEBUG
        )
