"""Choosing the link to a peer (pure): direct, then punched, then relayed.

A peer may be known through several links at once: its own listening addresses (direct),
a socket obtained by hole punching, and circuits through one or more relays. ``choose``
returns the best usable link: links that failed recently are skipped until their
``retry_after_s``; among the rest, the kind decides (direct < punched < relayed), then the
measured round-trip time (unknown last), then the address for a stable order.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Link", "LinkKind", "choose", "ranked"]


class LinkKind(enum.IntEnum):
    """Preference order: lower is better."""

    DIRECT = 0
    PUNCHED = 1
    RELAYED = 2


@dataclass(frozen=True, kw_only=True, slots=True)
class Link:
    kind: LinkKind
    address: str
    """``host:port`` (direct), the punched peer's ``ip:port``, or the relay's ``host:port``."""
    via: bytes = b""
    """Raw PeerID of the relay for a relayed link, else empty."""
    rtt_s: float | None = None
    """Measured round trip, if known."""
    retry_after_s: float = 0.0
    """Monotonic time before which the link is not used (it failed)."""


def _key(link: Link) -> tuple[int, float, str, bytes]:
    rtt = link.rtt_s if link.rtt_s is not None else float("inf")
    return (int(link.kind), rtt, link.address, link.via)


def ranked(links: Iterable[Link], now_s: float) -> list[Link]:
    """Usable links at ``now_s``, best first."""
    return sorted((link for link in links if link.retry_after_s <= now_s), key=_key)


def choose(links: Iterable[Link], now_s: float) -> Link | None:
    """The best usable link at ``now_s``, or None when every link is backing off."""
    usable = ranked(links, now_s)
    return usable[0] if usable else None
